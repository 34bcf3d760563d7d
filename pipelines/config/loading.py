"""Reading YAML files into models: one-line errors naming file, field and fix; `defaults:` merging and
`key=value` overrides; writing an ensemble back."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .base import Project
from .competition import Competition
from .ensemble import Ensemble


# --------------------------------------------------------------------------------------------- loading
def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(' line N', problem) of a parser error, on one line: the parser's own message spans lines (a context block
    with its mark, then the problem with its mark, each quoting the source line)."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: no line mark, a position
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        what = (f"character #x{e.character:04x}" if isinstance(e.character, int) else f"byte {e.character!r}")
        return (f" line {line}" if line else ""), f"unacceptable {what}: {e.reason}"
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    problem = getattr(e, "problem", None) or str(e)
    if context:
        start = getattr(e, "context_mark", None)
        problem += f" {context}" + (f" started at line {start.line + 1}" if start and mark and start.line != mark.line else "")
    return (f" line {mark.line + 1}" if mark else ""), " ".join(problem.split())


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e, text)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that `loc` (minus its last part) points into, for did-you-mean hints."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            for inner in (c, *getattr(c, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
        else:
            return []
    return list(model.model_fields)


def one_line_error(path: Path, err: ValidationError, model: type[BaseModel], rename=lambda loc: loc) -> ConfigError:
    """The first pydantic error as `file: field.path: problem; fix`."""
    first = err.errors()[0]
    loc = rename(tuple(first["loc"]))
    # one value in defaults fails once per member: count it once
    distinct = len({(rename(tuple(e["loc"])), e["msg"]) for e in err.errors()})
    more = f" (and {distinct - 1} more)" if distinct > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(first["loc"]))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return ConfigError(f"{path}: {_loc(loc)}: unknown key; {hint}{more}")
    if first["type"] == "missing":
        return ConfigError(f"{path}: {_loc(loc)}: required, add it{more}")
    got = first.get("input")
    got = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{path}: {_loc(loc) or 'top level'}: {msg}{got}{more}")


def load_competition(project: Project, name: str) -> Competition:
    path = project.competitions / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in project.competitions.glob("*.yaml"))
        raise ConfigError(f"{project.relative(path)}: no such competition '{name}'; known: {', '.join(known) or 'none'}")
    raw = read_yaml(path)
    raw.setdefault("name", name)
    try:
        return Competition.model_validate(raw)
    except ValidationError as e:
        raise one_line_error(project.relative(path), e, Competition) from None


def resolve_ensemble_path(project: Project, spec: str) -> Path:
    """`paddy/final.yaml` resolves under ensembles/; a plain path works too."""
    for candidate in (Path(spec), project.ensembles / spec, project.ensembles / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{spec}: no such ensemble (looked in the current folder and {project.relative(project.ensembles)}/); "
                      "`ls ensembles/*/` shows the known ones")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(raw: dict, overrides: list[str], source: str = "command line") -> dict:
    """`a.b=value` (value parsed as YAML) set into `raw`; `members.NAME.field=value` targets one member by name,
    `members.*.field=value` every member (their own values included, which `defaults.field` would not beat)."""
    raw = deep_merge(raw, {})
    expanded = []
    for item in overrides:
        if item.startswith("members.*."):
            names = [m.get("name", i) for i, m in enumerate(raw.get("members") or []) if isinstance(m, dict)]
            expanded += [f"members.{n}.{item[len('members.*.'):]}" for n in names]
        else:
            expanded.append(item)
    for item in expanded:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: '{item}': an override is key=value, e.g. defaults.epochs=1 or members.NAME.lr=0.01")
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # members: pick by name, else by index
                names = [m.get("name") for m in node if isinstance(m, dict)]
                if part in names:
                    node = node[names.index(part)]
                elif part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise ConfigError(f"{source}: '{key}': no member named '{part}'; members: {', '.join(map(str, names))}")
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    raise ConfigError(f"{source}: '{key}': '{'.'.join(parts[:i + 1])}' is not a mapping")
                node = node.setdefault(part, {})
        if isinstance(node, list):
            raise ConfigError(f"{source}: '{key}': name a member field, e.g. members.NAME.lr=0.01")
        node[parts[-1]] = value
    return raw


def write_ensemble(dest: Path, raw: dict, header: str) -> Path:
    """An ensemble YAML written by a verb (`ablate --write`, `tune --write`): a comment saying how, then `raw`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return dest


def load_ensemble(project: Project, spec: str, overrides: list[str] = ()) -> tuple[Path, Ensemble, Competition]:
    path = resolve_ensemble_path(project, spec)
    shown = project.relative(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    defaults = raw.get("defaults") or {}
    members = raw.get("members")
    if not isinstance(defaults, dict):
        raise ConfigError(f"{shown}: defaults: expected a mapping of member fields")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ConfigError(f"{shown}: members: expected a list of members, each a mapping with name and arch")
    merged = dict(raw, members=[deep_merge(defaults, m) for m in members])

    def blame_defaults(loc: tuple) -> tuple:
        # an error in a field the member inherited from defaults: point at defaults, where the user typed it
        if (len(loc) >= 3 and loc[0] == "members" and isinstance(loc[1], int)
                and loc[2] not in members[loc[1]] and loc[2] in defaults):
            return ("defaults", *loc[2:])
        return loc

    try:
        ensemble = Ensemble.model_validate(merged, context={"check_files": True})
    except ValidationError as e:
        raise one_line_error(shown, e, Ensemble, blame_defaults) from None
    competition = load_competition(project, ensemble.competition)
    return path, ensemble, competition
