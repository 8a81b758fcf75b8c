"""Tests of the Kubernetes deployment: Helm chart, schemas, invariants, dashboards, image."""
