"""Device profiles: one TOML file per device class, a typed loader and on-device detection.

Stdlib only, so it runs on the smallest device. ``load_profiles()`` returns the built-in profiles plus
any user profile directories (``EDGEFED_PROFILE_PATH``, ``os.pathsep``-separated, later entries win).
"""

from device_profiles.loader import (
    PROFILE_PATH_ENV,
    DeviceProfile,
    ProfileError,
    builtin_profile_dir,
    get_profile,
    load_profile,
    load_profiles,
)

__all__ = [
    "PROFILE_PATH_ENV",
    "DeviceProfile",
    "ProfileError",
    "builtin_profile_dir",
    "get_profile",
    "load_profile",
    "load_profiles",
]
