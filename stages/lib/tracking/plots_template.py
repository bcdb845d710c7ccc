"""Build the HTML template that makes ``dvc plots show`` draw its plots with no network.

DVC's default page loads vega, vega-lite and vega-embed from a CDN. This template inlines the same versions (the
minified builds of the npm packages) and leaves out DVC's ``{scripts}`` placeholder, so that no CDN tag is added.
``.dvc/config`` points ``plots.html_template`` at the result. Rebuild it (only needed for other vega versions)::

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python -m stages.lib.tracking.plots_template vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz \\
        > .dvc/plots/offline.html
"""

from __future__ import annotations

import re
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("vega", "vega-lite", "vega-embed")  # in load order: vega-embed needs both others
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what dvc_render replaces in the template

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{libraries}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def read_package(tarball: Path) -> tuple[str, str, str, str]:
    """(name, version, license text, minified build) of an ``npm pack`` tarball."""
    import json

    with tarfile.open(tarball) as tar:
        meta = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        name = meta["name"]
        build = tar.extractfile(f"package/build/{name}.min.js").read().decode()  # type: ignore[union-attr]
        licence = tar.extractfile("package/LICENSE").read().decode()  # type: ignore[union-attr]
    return name, meta["version"], licence, build


def script(name: str, version: str, licence: str, build: str) -> str:
    """One inline ``<script>`` with the package's licence in a comment before it."""
    for placeholder in PLACEHOLDERS:
        if placeholder in build:
            raise ValueError(f"{name}@{version}: the build contains DVC's placeholder {placeholder}")
    comment = licence.strip().replace("--", "- -")
    body = re.sub(r"</(script)", r"<\\/\1", build, flags=re.IGNORECASE)
    return f"<!-- {name}@{version} (npm), its licence:\n{comment}\n-->\n<script>\n{body}\n</script>"


def build_template(tarballs: Sequence[Path]) -> str:
    """The template page with the packages of ``tarballs`` inlined in load order."""
    packages = {p[0]: p for p in map(read_package, map(Path, tarballs))}
    missing = [name for name in PACKAGES if name not in packages]
    if missing:
        raise SystemExit(f"error: no npm tarball for {', '.join(missing)}: npm pack them and pass all three")
    return PAGE.format(libraries="\n".join(script(*packages[name]) for name in PACKAGES))


if __name__ == "__main__":
    sys.stdout.write(build_template(sys.argv[1:]))
