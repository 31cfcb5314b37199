"""The container around localllm: settings, the model file, the CPU, supervision of
the server, and the code that runs inside the server. `entrypoint.py` calls `cli.main`.

Modules, one concern each (README.md has the table): cli, settings, resources, cpu,
model, files, cache, supervisor, check, and the server package, which runs inside the
model server process and imports nothing else of this package.
"""
