"""The bench suite behind `tempflow-fast bench`: subjects (subjects.py) measured with GPU telemetry
(telemetry.py), the engine beside a per-branch reference loop (reference.py), one result schema
rendered as CSV, markdown and plots (results.py)."""
