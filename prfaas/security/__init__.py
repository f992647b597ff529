"""Security: mutual TLS on every link (`tls`), identities from certificates (`identity`), the
cluster's certificates (`pki`), authorisation per gRPC method (`authz`), client tokens and
per-client limits (`tokens`). docs/security.md has the threat model and the rules."""
