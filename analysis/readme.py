"""The README's generated results section: the lines that delimit it, and the section the report writes there."""
import os
from pathlib import Path

from adapters.errors import AdapterError

def markers(name="results"):
    """The lines that delimit a generated section: the study's results, or another command's (a suite's)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


README_BEGIN, README_END = markers()


def readme_parts(path, name="results"):
    """(text before the section, text after it) of a README with exactly one section `name`."""
    path = Path(path)
    begin, end = markers(name)
    if not path.is_file():
        raise AdapterError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise AdapterError(f"--readme {path}: needs one line {begin} and, after it, one line {end}")
    head, rest = text.split(begin)
    return head, rest.split(end)[1]


def readme_section(result, readme):
    """The results section: the report's tables, then its figures linked relative to the README."""
    where = Path(readme).resolve().parent
    pngs = [p for p in result["figures"] if p.endswith(".png")]
    links = [f"![{Path(p).stem}]({os.path.relpath(Path(p).resolve(), where)})" for p in pngs]
    command = f"python -m analysis.report {result['settings']['runs']} --out {result['settings']['out']} --readme " \
              f"{Path(readme).name}"
    return (f"<!-- written by `{command}`: edits here are overwritten -->\n\n" + result["markdown"] + "\n"
            + "\n".join(links) + "\n")


def write_readme(readme, section, name="results"):
    """Replace the README's section `name` with `section`."""
    from adapters.io import write_text
    head, tail = readme_parts(readme, name)
    begin, end = markers(name)
    write_text(readme, head + begin + "\n" + section + end + tail)
