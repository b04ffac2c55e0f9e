"""Dispatch policies: what ``auto`` runs on one kind of GPU, measured there.

A policy is a small JSON file per device kind (GPU name + compute capability) written by ``vit-fast tune``. For
each op, dtype (the one its matmuls run in), mode (``fwd``: no gradient wanted; ``fwd+bwd``) and shape bucket it
records every backend's verified, measured time and the order ``auto`` tries them in: the kernel backends that
beat the reference beyond the noise, fastest first, then the reference. A backend that was not verified and
timed never appears in that order, so unmeasured means the reference. Each entry also holds the verdict under
``torch.compile`` (``compiled_order``): the kernel backends that beat what inductor makes of the op, measured at
the same shape; :func:`choose` with ``compiled=True`` follows it (an entry from before it was recorded gives its
eager order, and says so).

Where the policy for a device comes from, first found wins:

1. ``$VIT_FAST_POLICY``: a policy file, or a folder of them named by :func:`file_name` (then nothing else is
   looked at: an explicit choice is never silently replaced);
2. the user's cache: ``$XDG_CACHE_HOME/vit_fast/policies/`` (default ``~/.cache/vit_fast/policies/``), where
   ``vit-fast tune`` writes;
3. the policies shipped in the package (``vit_fast/policies/``), measured by the project.

A file that cannot be read, or was measured on another GPU or with other torch/triton (major.minor) or
vit_fast versions, is passed over with a warning that says so; with none left ``auto`` runs the reference.

Selection stays guard-friendly under ``torch.compile``: the file is read once per device, at the first pick on
it (never at import), and :func:`choose` is an opaque constant to Dynamo (its result depends only on its
constant arguments), so a compiled graph holds the choice, not the lookup.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass, field

import torch

from vit_fast.fileio import atomic_write

SCHEMA = "vit_fast.policy/1"
ENV = "VIT_FAST_POLICY"
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")
TUNE_HINT = "run `vit-fast tune` to measure the kernels on this GPU and write one"

Decision = tuple[tuple[str, ...], tuple[tuple[str, float], ...], str]  # (order, speedups, because)


class PolicyWarning(UserWarning):
    """A policy file was passed over: unreadable, or measured on another GPU or with other versions."""


# ---- device kinds, versions, where the files live ---------------------------------------------------------------


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return name or "unknown"


def device_kind(device: torch.device | str) -> dict[str, str]:
    """What a policy is measured for: ``{"type", "name"}`` plus ``"capability"`` ("9.0") on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"type": device.type, "name": _cpu_name() if device.type == "cpu" else device.type}
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def file_name(kind: dict[str, str]) -> str:
    """``nvidia-h200-sm90.json`` for a GPU, ``cpu-<model>.json`` for a CPU."""
    if kind["type"] == "cuda":
        return f"{_slug(kind['name'])}-sm{kind['capability'].replace('.', '')}.json"
    return f"{kind['type']}-{_slug(kind['name'])}.json"


def user_dir() -> str:
    """The per-user policy folder: ``$XDG_CACHE_HOME/vit_fast/policies`` (``~/.cache/...`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vit_fast", "policies")


def _env_path(kind: dict[str, str]) -> str | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    return os.path.join(value, file_name(kind)) if os.path.isdir(value) or value.endswith(os.sep) else value


def default_path(kind: dict[str, str]) -> str:
    """Where ``vit-fast tune`` writes the policy for ``kind``: ``$VIT_FAST_POLICY``, else the user folder."""
    return _env_path(kind) or os.path.join(user_dir(), file_name(kind))


def candidates(kind: dict[str, str]) -> list[tuple[str, str]]:
    """``(path, origin)`` of every file that may hold the policy for ``kind``, in the order they are tried."""
    env = _env_path(kind)
    if env is not None:
        return [(env, f"${ENV}")]
    return [(os.path.join(user_dir(), file_name(kind)), "user cache"),
            (os.path.join(SHIPPED_DIR, file_name(kind)), "shipped with vit_fast")]


def versions() -> dict[str, str | None]:
    """The versions a policy is measured with and checked against."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as absent
        triton_version = None
    # the package is imported before any of its modules: reading its version here, not importing it, keeps the
    # import graph acyclic (vit_fast imports backends, which imports this module)
    package = sys.modules.get("vit_fast")
    return {"vit_fast": getattr(package, "__version__", None), "torch": torch.__version__, "triton": triton_version}


def _series(version: str | None) -> str | None:
    """``2.11.0+cu130`` -> ``2.11``: patch releases do not change which kernel is faster."""
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


# ---- reading and checking a file -------------------------------------------------------------------------------


def format_problems(doc: object) -> list[str]:
    """What makes ``doc`` not a policy (empty when it is one)."""
    if not isinstance(doc, dict):
        return [f"not a JSON object (got {type(doc).__name__})"]
    if doc.get("schema") != SCHEMA:
        return [f"schema is {doc.get('schema')!r}, not {SCHEMA!r}"]
    found = []
    for key, kind in (("device", dict), ("versions", dict), ("entries", list)):
        if not isinstance(doc.get(key), kind):
            found.append(f"{key!r} missing or not a {kind.__name__}")
        elif kind is dict and not all(isinstance(v, (str, type(None))) for v in doc[key].values()):
            found.append(f"{key!r} holds a value that is not a string")
    for i, e in enumerate(doc.get("entries") or []):
        ok = (isinstance(e, dict) and isinstance(e.get("op"), str) and isinstance(e.get("dtype"), str)
              and e.get("mode") in MODES and isinstance(e.get("bucket"), list)
              and all(isinstance(b, int) for b in e["bucket"]) and len(e["bucket"]) > 0
              and isinstance(e.get("order"), list) and all(isinstance(b, str) for b in e["order"])
              and "reference" in e["order"] and isinstance(e.get("measured"), dict)
              and ("compiled_order" not in e or (isinstance(e["compiled_order"], list)
                                                 and all(isinstance(b, str) for b in e["compiled_order"])
                                                 and "reference" in e["compiled_order"])))
        if not ok:
            found.append(f"entry {i} is malformed (needs op, dtype, mode, bucket, an order holding the "
                         "reference, measured; a compiled_order, when there, holds the reference too)")
            break
    return found


def stale_problems(doc: dict, kind: dict[str, str]) -> list[str]:
    """Why a well-formed policy does not apply here: another device, or other versions."""
    found = []
    dev = doc["device"]
    if dev.get("type") != kind["type"] or dev.get("name") != kind["name"] or \
            dev.get("capability") != kind.get("capability"):
        found.append(f"measured on {describe_kind(dev)}, this is {describe_kind(kind)}")
    now = versions()
    for lib, same in (("torch", _series), ("triton", _series), ("vit_fast", lambda v: v)):
        then = doc["versions"].get(lib)
        if same(then) != same(now[lib]):
            found.append(f"measured with {lib} {then}, this is {lib} {now[lib]}")
    return found


def describe_kind(kind: dict) -> str:
    cap = f" (sm {kind['capability']})" if kind.get("capability") else ""
    return f"{kind.get('name')}{cap}"


@dataclass
class Policy:
    """A policy file in force: its entries indexed for lookup."""

    path: str
    origin: str
    doc: dict
    table: dict[tuple, dict] = field(default_factory=dict)  # (op, dtype, mode, bucket) -> entry
    by_size: dict[tuple, list[tuple[int, dict]]] = field(default_factory=dict)  # key less the size -> sorted

    def __post_init__(self) -> None:
        for e in self.doc["entries"]:
            bucket = tuple(e["bucket"])
            self.table[(e["op"], e["dtype"], e["mode"], bucket)] = e
            self.by_size.setdefault((e["op"], e["dtype"], e["mode"], bucket[:-1]), []).append((bucket[-1], e))
        for sizes in self.by_size.values():
            sizes.sort(key=lambda s: s[0])

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def lookup(self, op: str, dtype: str, mode: str, bucket: tuple[int, ...]) -> tuple[dict | None, str]:
        """The entry for this key, and how it was found. A bucket between two measured sizes (the last element
        of a bucket is its batch-like size) takes their choice when both made the same one."""
        entry = self.table.get((op, dtype, mode, bucket))
        if entry is not None:
            return entry, ""
        sizes = self.by_size.get((op, dtype, mode, bucket[:-1]), [])
        below = [e for s, e in sizes if s < bucket[-1]]
        above = [e for s, e in sizes if s > bucket[-1]]
        if below and above and below[-1]["order"] == above[0]["order"]:
            return below[-1], f" (between measured sizes {below[-1]['bucket'][-1]} and {above[0]['bucket'][-1]})"
        return None, ""


@dataclass
class Found:
    """What was found for one device: the policy in force (or None) and a line saying what and why."""

    kind: dict[str, str]
    policy: Policy | None
    note: str


def read(path: str) -> dict:
    """The JSON document of a policy file (raises OSError / ValueError)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find(kind: dict[str, str]) -> Found:
    """The first usable policy for ``kind`` among :func:`candidates`; a clear warning for each file passed over."""
    passed = []
    for path, origin in candidates(kind):
        if not os.path.exists(path):
            continue
        try:
            doc = read(path)
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            problems = [f"unreadable ({type(e).__name__}: {e})"]
        else:
            problems = format_problems(doc) or stale_problems(doc, kind)
        if not problems:
            return Found(kind, Policy(path, origin, doc), f"policy {path} ({origin}; {_measured_line(doc)})")
        why = "; ".join(problems)
        passed.append(f"{path} ({why})")
        warnings.warn(f"vit_fast: dispatch policy {path} ({origin}) is not used: {why}. auto runs the reference "
                      f"for {describe_kind(kind)} unless another policy applies; {TUNE_HINT}.", PolicyWarning,
                      stacklevel=3)
    if kind["type"] == "cuda":
        none = f"no policy for {describe_kind(kind)}: auto runs the reference (PyTorch) on CUDA; {TUNE_HINT}"
    else:
        none = f"no policy for {kind['type']} ({kind['name']}): auto runs the reference on {kind['type']}"
    if passed:
        none += "; passed over: " + "; ".join(passed)
    return Found(kind, None, none)


def _measured_line(doc: dict) -> str:
    v = doc["versions"]
    return (f"measured {str(doc.get('created', '?'))[:10]} on {describe_kind(doc['device'])} with torch "
            f"{v.get('torch')}, triton {v.get('triton')}, vit_fast {v.get('vit_fast')}; {len(doc['entries'])} "
            "entries")


_FOUND: dict[str, Found] = {}  # device ("cuda:0", "cpu") -> what was found, at the first pick on it
_DECISIONS: dict[tuple, Decision] = {}


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def found(device: torch.device | str) -> Found:
    """The policy for ``device``, looked up once per device (the first call reads the file)."""
    key = _device_key(device)
    if key not in _FOUND:
        _FOUND[key] = find(device_kind(key))
    return _FOUND[key]


def looked_up() -> tuple[str, ...]:
    """The devices ("cuda:0", "cpu") whose policy has been looked up since import or :func:`reset`."""
    return tuple(_FOUND)


def reset() -> None:
    """Forget what was looked up: the next pick reads the policy files again (after ``vit-fast tune``, in
    tests). Graphs already compiled keep the choices they were traced with."""
    _FOUND.clear()
    _DECISIONS.clear()


def describe(device: torch.device | str) -> str:
    """One line: the policy in force for ``device`` and what it was measured with, or why there is none."""
    return found(device).note


# ---- the choice --------------------------------------------------------------------------------------------------


def speedups(entry: dict, key: str = "speedup") -> tuple[tuple[str, float], ...]:
    """Every measured backend's speedup over the reference (``key="compiled_speedup"``: over inductor's code for
    the op), as the entry records it."""
    return tuple((b, float(m[key])) for b, m in entry["measured"].items()
                 if isinstance(m, dict) and isinstance(m.get(key), (int, float)))


@torch.compiler.assume_constant_result
def choose(device_type: str, index: int | None, op: str, dtype: str, mode: str, bucket: tuple[int, ...],
           compiled: bool = False) -> Decision:
    """``(order, speedups, because)`` for one call on device ``device_type:index``: the backends to try in order
    (ending with the reference), each measured backend's speedup over the reference, and a line saying why. The
    caller takes the first backend in ``order`` that can run the inputs. ``compiled``: the call is traced by
    ``torch.compile`` (the dispatcher passes ``torch.compiler.is_compiling()``), so the order is the compiled
    verdict: the kernels that beat inductor's code for the op. (Plain arguments, not a torch.device: Dynamo passes
    them to this opaque function as constants.)"""
    key = (device_type, index, op, dtype, mode, bucket, compiled)
    if key not in _DECISIONS:
        device = device_type if index is None else f"{device_type}:{index}"
        _DECISIONS[key] = _decide(found(device), op, dtype, mode, bucket, compiled)
    return _DECISIONS[key]


def _decide(where: Found, op: str, dtype: str, mode: str, bucket: tuple[int, ...], compiled: bool = False
            ) -> Decision:
    if where.policy is None:
        return ("reference",), (), where.note
    entry, how = where.policy.lookup(op, dtype, mode, bucket)
    what = f"{op} {dtype} {mode}, bucket {bucket}"
    if entry is None:
        return ("reference",), (), f"policy {where.policy.name} has no measurement for {what}: the reference"
    versus = "the reference"
    if compiled and "compiled_order" in entry:
        what += " under torch.compile"
        versus = "inductor's code"
        entry = {**entry, "order": entry["compiled_order"], "why": entry.get("compiled_why", entry.get("why"))}
    elif compiled:
        how += " (this policy holds no torch.compile verdict: the eager one)"
    order = tuple(entry["order"][: entry["order"].index("reference") + 1])
    gains = speedups(entry, "compiled_speedup" if versus != "the reference" else "speedup")
    first = order[0]
    if first == "reference":
        others = ", ".join(f"{b} {s:.2f}x" for b, s in gains if b != "reference")
        because = (f"policy {where.policy.name}: the reference measured fastest for {what}{how}"
                   f"{f' (others: {others})' if others else ''}")
        why_not = entry.get("why")
        if why_not and not others:
            because += f": {why_not}"
        return order, gains, because
    gain = dict(gains).get(first, float("nan"))
    return order, gains, f"policy {where.policy.name}: {first} measured {gain:.2f}x {versus} for {what}{how}"


# ---- writing ---------------------------------------------------------------------------------------------------


def new_document(kind: dict[str, str], **meta: object) -> dict:
    """An empty policy for ``kind`` measured with the versions of this process; ``meta`` adds fields."""
    return {"schema": SCHEMA, "device": dict(kind), "versions": versions(), **meta, "entries": []}


def write(path: str, doc: dict) -> None:
    """Write a policy atomically (a reader never sees a torn file) and forget cached lookups."""
    problems = format_problems(doc)
    if problems:
        raise ValueError(f"not a valid policy: {'; '.join(problems)}")
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
    reset()
