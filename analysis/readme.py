"""The README's generated results section: the lines that delimit it, and the section the report writes there."""
import os
from pathlib import Path

from adapters.errors import AdapterError

README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_parts(path):
    """(text before the section, text after it) of a README with exactly one results section."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise AdapterError(f"--readme {path}: needs one line {README_BEGIN} and, after it, one line {README_END}")
    head, rest = text.split(README_BEGIN)
    return head, rest.split(README_END)[1]


def readme_section(result, readme):
    """The results section: the report's tables, then its figures linked relative to the README."""
    where = Path(readme).resolve().parent
    pngs = [p for p in result["figures"] if p.endswith(".png")]
    links = [f"![{Path(p).stem}]({os.path.relpath(Path(p).resolve(), where)})" for p in pngs]
    command = f"python -m analysis.report {result['settings']['runs']} --out {result['settings']['out']} --readme " \
              f"{Path(readme).name}"
    return (f"<!-- written by `{command}`: edits here are overwritten -->\n\n" + result["markdown"] + "\n"
            + "\n".join(links) + "\n")


def write_readme(readme, section):
    """Replace the README's results section with `section`."""
    from adapters.io import write_text
    head, tail = readme_parts(readme)
    write_text(readme, head + README_BEGIN + "\n" + section + README_END + tail)
