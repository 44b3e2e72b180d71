"""edgefed cloud hub: registry, MQTT control plane, artifact fan-out, OIP gRPC inference, admin API and
the operator CLI (``cloud-hub``)."""
