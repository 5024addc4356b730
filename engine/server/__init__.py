"""The ASGI server: web chat and channel webhooks (plugins), agent console, health, metrics."""
