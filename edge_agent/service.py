"""The systemd unit `edge-agent install-service` writes."""

from __future__ import annotations

from pathlib import Path


def systemd_unit(python: str, state_dir: Path, user: str) -> str:
    return f"""[Unit]
Description=edgefed edge agent (model deployments, local inference, telemetry)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
Environment=EDGEFED_STATE_DIR={state_dir}
ExecStart={python} -m edge_agent.cli run --state-dir {state_dir}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=20
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
ReadWritePaths={state_dir}
UMask=0027

[Install]
WantedBy=multi-user.target
"""
