"""The OpenAI-compatible HTTP server: `create_app(AsyncEngine(...))` in `llmos.server.app`,
run by `llmos serve` (or `llmos.server.launch.serve_in_thread`)."""
