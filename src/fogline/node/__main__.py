"""`python -m fogline.node CONFIG_JSON`: the lean node process.

`fogline node` parses its options (typer, rich, pydantic), enrolls if needed (httpx,
cryptography), then replaces itself with this entry point through exec, so the
long-running agent carries none of those modules: about 20 MB less on a small device,
same PID for the supervisor.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from fogline.node.agent import NodeAgent, NodeConfig
from fogline.runtime import run_service


def main(argv: list[str]) -> None:
    options = json.loads(argv[1])
    options["data_dir"] = Path(options["data_dir"])
    logging.basicConfig(level=options.pop("log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    run_service(NodeAgent(NodeConfig(**options)).run)


if __name__ == "__main__":
    main(sys.argv)
