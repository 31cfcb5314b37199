"""What the tests and the benchmarks share, so each exists once: a clean environment
derived from the settings table and a free port (environment), `entrypoint.py serve`
as a process (server), and a stand-in for the Hugging Face hub (hub_standin).
Not part of the image. Import it from the repository root (pytest's pythonpath, or
`python -m bench.NAME`).
"""
