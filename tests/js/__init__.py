"""Tests of the browser client (edge/static/waddle.js), run with Node's test runner."""
