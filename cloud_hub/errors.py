"""Hub errors. Operators see ``str(error)``; it names the cause and the fix.

HubError
├── BrokerError       the embedded broker cannot start (port taken, ...) or the broker is unreachable
├── NotFound          unknown model, version, device or deployment
├── Conflict          the request contradicts the registry (no artifact for a device's profile, ...)
└── RegistryError     the registry cannot be opened: a schema newer than this edgefed, a bad database URL
"""


class HubError(Exception):
    pass


class BrokerError(HubError):
    pass


class NotFound(HubError):
    pass


class Conflict(HubError):
    pass


class RegistryError(HubError):
    pass
