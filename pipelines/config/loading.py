"""Reading YAML files into models: one-line errors naming file, field and fix; `defaults:` merging and
`key=value` overrides; writing an ensemble back."""

from __future__ import annotations

import copy
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


def _problems(err: ValidationError, model: type[BaseModel], rename=lambda loc: loc) -> list[tuple[tuple, str, str]]:
    """Every pydantic error as (location, pydantic's type, 'problem; fix'), each once: one value in defaults fails
    once per member."""
    out = {}
    for e in err.errors():
        loc = rename(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(e["loc"]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            text = "unknown key; " + (f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}")
        elif e["type"] == "missing":
            text = "required, add it"
        else:
            got = e.get("input")
            got = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            text = e["msg"].removeprefix("Value error, ") + got
        out.setdefault((loc, text), (loc, e["type"], text))
    return list(out.values())


def _numbered(where: str, problems: list[str]) -> str:
    """`where: problem`, or `where: 3 problems: (1) ...; (2) ...; (3) ...` (the CLI shows one line)."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))


def problems_error(path, problems: list[tuple[tuple, str, str]], overrides: list[tuple[str, tuple]] = (),
                   theirs_too: set = frozenset()) -> ConfigError:
    """One line for every problem at once: the file's under its name; those the command-line overrides
    (`overrides`: (item as typed, the location it sets)) brought, under 'command line', naming the item. With
    overrides, `theirs_too` holds the (location, problem) the file has without them: the rest are the overrides'."""
    mine, theirs = {}, []  # mine: item -> its problems
    for loc, kind, text in problems:
        item = None
        if overrides and (loc, text) not in theirs_too:
            item = next((o[0] for o in overrides if _caused_by(loc, kind, o[1])), None) or \
                next((o[0] for o in overrides if o[1][:len(loc)] == loc), " ".join(dict.fromkeys(o[0] for o in overrides)))
        if item is None:
            theirs.append(f"{_loc(loc) or 'top level'}: {text}")
        elif kind == "extra_forbidden":
            mine.setdefault(item, []).append(f"unknown key '{loc[-1]}'" + text.removeprefix("unknown key"))
        else:
            typed = next((o[1] for o in overrides if o[0] == item), ())
            inner = f"{_loc(loc)}: " if loc != typed and kind != "ignored" else ""
            mine.setdefault(item, []).append(f"{inner}{text}")
    said = []
    for item, texts in mine.items():
        texts = list(dict.fromkeys(texts))
        ignored = [t for t in texts if t.startswith("ignored: ")]  # `members.*.epochs=1`: said for the first member
        if len(ignored) > 1:
            texts = [t for t in texts if t not in ignored[1:]]
            texts[texts.index(ignored[0])] += f" (and alike for {len(ignored) - 1} more members)"
        said += [f"{item}: {t}" for t in texts]
    parts = ([_numbered("command line", said)] if said else []) + \
            ([_numbered(str(path), list(dict.fromkeys(theirs)))] if theirs else [])
    return ConfigError("; ".join(parts))


def _caused_by(loc: tuple, kind: str, typed: tuple) -> bool:
    """Whether an error at `loc` comes from an override that set `typed`: a value at or under it, or an unknown
    key on its path (`default.epochs=1` makes an unknown `default`)."""
    return loc[:len(typed)] == typed or (kind == "extra_forbidden" and typed[:len(loc)] == loc)


def one_line_error(path: Path, err: ValidationError, model: type[BaseModel], rename=lambda loc: loc,
                   overrides: list[tuple[str, tuple]] = ()) -> ConfigError:
    """Every pydantic error as one line: `file: field.path: problem; fix`, numbered when there are several."""
    return problems_error(path, _problems(err, model, rename), overrides)


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
    raw = copy.deepcopy(raw)  # the caller's stays as it was (`load_ensemble` checks it without the overrides)
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
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            _, problem = _yaml_problem(e, text)
            raise ConfigError(f"{source}: '{item}': the value is not YAML ({problem}); quote it for the shell, "
                              "e.g. 'defaults.size=[224,288]' or 'members.NAME.aug_transforms={max_rotate: 5}'") from None
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


def override_locations(raw: dict, overrides: list[str]) -> list[tuple[str, tuple]]:
    """(item as typed, the location it sets) per override, members by index as pydantic's errors name them;
    `members.*.x` once per member."""
    names = [m.get("name") if isinstance(m, dict) else None for m in raw.get("members") or []]
    out = []
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        if parts[0] == "members" and len(parts) > 1:
            which = (range(len(names)) if parts[1] == "*" else [names.index(parts[1])] if parts[1] in names
                     else [int(parts[1])] if parts[1].isdigit() else [])
            out += [(item, ("members", i, *parts[2:])) for i in which]
        else:
            out.append((item, tuple(parts)))
    return out


def _has(raw: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def ignored_problems(members: list, raw_members: list[dict], defaults: dict, overridden: list[tuple[str, tuple]]):
    """The errors among the fields members ignore (`Member.ignored`): one a member sets itself (in the YAML or by
    an override), or a `defaults:` value set on the command line that no member uses. `members` holds the
    validated members (None where a member failed its own checks)."""
    problems, by_default = [], {}
    for i, (member, own) in enumerate(zip(members, raw_members)):
        for field, why in member.ignored() if member is not None else ():
            if _has(own, field):
                problems.append((("members", i, *field.split(".")), "ignored", why))
            elif _has(defaults, field):
                by_default.setdefault(field, []).append(why)
    for field, whys in by_default.items():
        loc = ("defaults", *field.split("."))
        typed = any(_caused_by(loc, "", o[1]) for o in overridden)
        if typed and len(whys) == sum(m is not None for m in members):  # typed on the command line, used by none
            problems.append((loc, "ignored", whys[0] if len(whys) == 1 else
                             f"ignored by every member: {whys[0].removeprefix('ignored: ')}"))
    # a `defaults.x=v` typed on the command line that every member's own `x` beats (a starter's `epochs: 5`): the
    # smoke test would be the full run
    for item, loc in overridden:
        field = ".".join(map(str, loc[1:]))
        if loc[0] == "defaults" and field and raw_members and all(_has(own, field) for own in raw_members):
            problems.append((loc, "ignored", f"ignored: every member sets {field} itself, which defaults do not "
                                             f"override; use members.*.{field}={item.partition('=')[2]} instead"))
    return problems


def ignored_warnings(ensemble, overrides: list[str] = ()) -> list[str]:
    """Warnings for `defaults:` values some members ignore (the errors are `ignored_problems`'): when the value
    came from the command line (a smoke test's `defaults.epochs=1` that some members do not take), or when no
    member of the YAML uses it."""
    typed = [loc for _, loc in override_locations({}, list(overrides))]
    by_default: dict[str, list] = {}
    for m in ensemble.members:
        for field, why in m.ignored():
            if _has(ensemble.defaults, field):
                by_default.setdefault(field, []).append((m.name, why))
    out = []
    for field, who in by_default.items():
        loc = ("defaults", *field.split("."))
        if any(_caused_by(loc, "", t) for t in typed) or len(who) == len(ensemble.members):
            names = ", ".join(name for name, _ in who)
            out.append(f"defaults.{field} is ignored by {names}: {who[0][1].removeprefix('ignored: ')}")
    return out


def load_ensemble(project: Project, spec: str, overrides: list[str] = (),
                  arch_problem=None) -> tuple[Path, Ensemble, Competition]:
    """The ensemble `spec` with `overrides`, every problem found reported at once (those the overrides brought
    under 'command line'). `arch_problem(arch, pretrained)` -> (field, problem) or None checks each member's
    architecture too."""
    path = resolve_ensemble_path(project, spec)
    shown = project.relative(path)
    original = read_yaml(path)
    overridden = override_locations(original, list(overrides))
    ensemble, problems = _checked(apply_overrides(original, list(overrides)), shown, overridden, arch_problem)
    if problems:
        theirs = set()
        if overrides:  # what the file has wrong without the overrides is the file's
            try:
                theirs = {(loc, text) for loc, _, text in _checked(original, shown, [], arch_problem)[1]}
            except ConfigError:
                pass
        raise problems_error(shown, problems, overridden, theirs)
    competition = load_competition(project, ensemble.competition)
    return path, ensemble, competition


def _checked(raw: dict, shown: str, overridden: list, arch_problem) -> tuple[Ensemble | None, list]:
    """(the ensemble, []) or (None, every problem found as (location, kind, problem)): pydantic's, the
    architectures', the fields members ignore. A structure not worth checking further is a ConfigError."""
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

    problems, ensemble = [], None
    try:
        ensemble = Ensemble.model_validate(merged, context={"check_files": True})
        valid = list(ensemble.members)
    except ValidationError as e:
        problems += _problems(e, Ensemble, blame_defaults)
        valid = [_valid_member(m) for m in merged["members"]]
    for i, m in enumerate(merged["members"]):
        if arch_problem is not None and isinstance(m.get("arch"), str):
            found = arch_problem(m["arch"], m.get("pretrained", True))
            if found:
                problems.append((blame_defaults(("members", i, found[0])), "arch", found[1]))
    problems += ignored_problems(valid, members, defaults, overridden)
    return (None if problems else ensemble), problems


def _valid_member(raw: dict):
    """The member `raw` describes, or None when it fails its own checks."""
    from .member import Member

    try:
        return Member.model_validate(raw, context={"check_files": True})
    except ValidationError:
        return None
