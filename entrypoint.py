#!/usr/bin/env python3
"""The container's entrypoint (the Dockerfile, the docs and DataSphere users call it):
`python entrypoint.py [serve|pull|config|health|check URL]`. The work is done by the
localllm_container package beside it; `python entrypoint.py --help` lists the commands.
"""
from localllm_container.cli import main

if __name__ == "__main__":
    main()
