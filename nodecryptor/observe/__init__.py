"""How the agent is seen from outside: Prometheus metrics, /healthz and /readyz, the small
HTTP server behind them, and the once-per-rejection report of refused claims."""
