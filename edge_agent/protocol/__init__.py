"""The wire contract both sides speak: topics, message schemas, the artifact manifest, signing and
verification, and the Open Inference Protocol gRPC stubs. Imports nothing else from the project."""
