"""Pieces every Waddle service shares: settings, structured logging, the
metrics/health HTTP listener and gRPC plumbing."""
