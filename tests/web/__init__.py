"""Browser tests of the demo chat page served by the edge."""
