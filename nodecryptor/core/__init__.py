"""The pure core every layer shares: settings, the data model passed between layers, errors,
port specifications, structured logging, run-directory records and retry backoff."""
