"""Where every number comes from: the numbered commands and environments the rows record, and what
each model argument is (its weights and the dtypes it ran in)."""

from __future__ import annotations

import json

from reports.cells import Cell, na


def _env_value(env: dict, key: str):
    if key not in env:
        return na("not recorded by the rows' spdbench version (re-run the command to record it)")
    value = env[key]
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


class Refs:
    """Numbered commands and environments, so every number can be traced to its origin."""

    def __init__(self, rows: list[dict]):
        self.commands: dict[str, dict] = {}
        self.envs: dict[str, dict] = {}
        for r in rows:
            cmd = self.commands.setdefault(
                str(r.get("command") or "n/a: no command recorded"),
                {"n": len(self.commands) + 1, "kinds": set(), "rows": 0},
            )
            cmd["kinds"].add(str(r.get("kind")))
            cmd["rows"] += 1
            env = r.get("env") if isinstance(r.get("env"), dict) else {}
            self.envs.setdefault(self._env_key(env), {"n": len(self.envs) + 1, "env": env, "rows": 0})["rows"] += 1

    @staticmethod
    def _env_key(env) -> str:
        """Environments that differ only in their timestamp are one environment."""
        env = env if isinstance(env, dict) else {}
        return json.dumps({k: v for k, v in env.items() if k != "time"}, sort_keys=True, default=str)

    def env_table(self) -> dict:
        """One column per environment, one row per field."""
        envs = list(self.envs.values())
        fields = sorted({k for e in envs for k in e["env"]})
        return {
            "header": ["field", *[f"env {e['n']} ({e['rows']} rows)" for e in envs]],
            "rows": [[k, *[_env_value(e["env"], k) for e in envs]] for k in fields],
        }

    def cell(self, command, env) -> Cell:
        c = self.commands[str(command or "n/a: no command recorded")]["n"]
        e = self.envs[self._env_key(env)]["n"]
        return Cell("", "ref", ((f"cmd {c}", f"#cmd-{c}"), (f"env {e}", f"#env-{e}")))


def identity_text(identity) -> str:
    """'SmolLM2-135M-Instruct (instruction-tuned): Q4_1 GGUF ..., dequantised to float32'."""
    if not isinstance(identity, dict) or not identity.get("name"):
        return "not recorded"
    variant = f" ({identity['variant']})" if identity.get("variant") else ""
    return f"{identity['name']}{variant}: {identity.get('weights') or 'weights not recorded'}"


def models_table(rows: list[dict]) -> dict:
    """One line per model argument: what the model is, and the dtypes it ran in."""
    models: dict[str, dict] = {}
    for r in rows:
        entry = models.setdefault(
            str(r.get("model")), {"identity": r.get("model_identity"), "dtypes": set(), "kinds": set()}
        )
        dtype = (r.get("model_identity") or {}).get("dtype") or r.get("dtype")
        if dtype:
            entry["dtypes"].add(str(dtype))
        entry["kinds"].add(str(r.get("kind")))
    body = [
        [
            model,
            identity_text(e["identity"]),
            ", ".join(sorted(e["dtypes"])) or na("not recorded"),
            ", ".join(sorted(e["kinds"])),
        ]
        for model, e in models.items()
    ]
    return {"header": ["model argument", "model and weights", "ran in", "rows"], "rows": body}
