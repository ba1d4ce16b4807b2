"""`make demo`: until wgpy-daemon and `wgpy up` exist, say so plainly."""

import sys


def main() -> int:
    print("make demo: coming. The demo (two namespaces, two wgpy peers, `wgpy show`) needs")
    print("wgpy-daemon and `wgpy up`, which are not built yet. Today: `make test` runs the protocol")
    print("core against wireguard-go; `.venv/bin/wgpy bench core` measures it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
