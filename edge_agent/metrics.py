"""The agent's own Prometheus metrics (opt-in: ``edge-agent run --metrics-port N``), read at scrape time
from the telemetry spool's counters and the agent's state, served by prometheus-client's HTTP server on
127.0.0.1 unless ``--metrics-host`` says otherwise. Labels are bounded by the models installed.

prometheus-client is imported only here, only when the flag is given: ``pip install prometheus-client``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

# spool counter → (metric name without _total, help)
_COUNTERS = {
    "spooled": ("edgefed_agent_calls_spooled", "Calls written to the telemetry spool"),
    "dropped": ("edgefed_agent_calls_dropped", "Calls lost to a full queue or spool, or a spool reset"),
    "budget_breaches": ("edgefed_agent_budget_breaches", "Local calls over the latency budget"),
    "spool_resets": ("edgefed_agent_spool_resets", "Times the spool file was made again"),
}


class AgentCollector:
    """Reads ``agent`` at every scrape (no state of its own, so nothing is counted twice)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        agent = self.agent
        counters = agent.spool.counters()
        for key, (name, text) in _COUNTERS.items():
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))
        yield GaugeMetricFamily("edgefed_agent_calls_pending", "Calls in the spool not yet sent",
                                value=agent.spool.pending_calls())  # fmt: skip
        yield GaugeMetricFamily("edgefed_agent_broker_connected", "1 when connected to the MQTT broker",
                                value=int(agent.mqtt.connected))  # fmt: skip
        yield CounterMetricFamily("edgefed_agent_installs", "Models installed and activated since the agent started",
                                  value=agent.installs)  # fmt: skip
        yield InfoMetricFamily("edgefed_agent", "This agent", value={"device": agent.device_id,
                               "profile": agent.profile.id, "version": __version__})  # fmt: skip
        active = GaugeMetricFamily("edgefed_agent_active_model", "1 per model for its active version",
                                   labels=["model", "version", "artifact_id"])  # fmt: skip
        for name in agent.store.names():
            record = agent.store.active(name)
            if record is not None:
                active.add_metric([name, record.version, record.artifact_id], 1)
        yield active


def start_metrics_server(agent: Agent, port: int, host: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Serve the agent's metrics at ``http://host:port/metrics`` (port 0: a free one, in
    ``server.server_port``); ConfigError naming the flag when it cannot."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client: pip install prometheus-client") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))  # type: ignore[arg-type]
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port} on --metrics-host {host}: {exc}; pick a free port") from None
    return server, thread
