"""The token store and file (api/tokens.py): hashes only, scopes, validation, reload on change, the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.tokens import (
    MAX_TOKEN_LENGTH,
    TokenEntry,
    TokenFile,
    TokenFileError,
    TokenStore,
    hash_token,
    main,
    new_token,
    read_token_file,
    write_token_file,
)

H = hash_token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_principals_from_the_operator_token_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", {"tokens": [
        {"name": "ev1", "role": "ev", "ev_ids": ["EV_1"], "sha256": H("t-ev1")},
        {"name": "cp", "role": "ev", "ev_ids": ["EV_9"], "ev_pattern": "CP_[0-9]+", "sha256": H("t-cp")},
        {"name": "wall", "role": "viewer", "sha256": H("t-wall")},
        {"name": "ops2", "role": "operator", "sha256": H("t-ops2")}]})
    store = TokenStore(SecretStr("t-op"), path)
    assert len(store) == 5 and store.configured and store.has_operator
    op = store.authenticate("t-op")
    assert op is not None and op.name == "API_TOKEN" and op.is_operator and op.may_act_for("anything")
    ev1 = store.authenticate("t-ev1")
    assert ev1 is not None and ev1.may_act_for("EV_1") and not ev1.may_act_for("EV_10")
    assert not ev1.reads_grid and not ev1.is_operator
    cp = store.authenticate("t-cp")
    assert cp is not None and cp.may_act_for("CP_1") and cp.may_act_for("EV_9")
    assert not cp.may_act_for("CP_1x") and not cp.may_act_for("xCP_1")  # a full match
    wall = store.authenticate("t-wall")
    assert wall is not None and wall.reads_grid and not wall.may_act_for("EV_1")
    ops2 = store.authenticate("t-ops2")
    assert ops2 is not None and ops2.is_operator
    for bad in ("", "t-op ", "T-OP", "t-o", H("t-op"), "x" * (MAX_TOKEN_LENGTH + 1)):
        assert store.authenticate(bad) is None, bad  # the stored hash itself is no token either


def test_no_tokens_at_all_and_no_operator(tmp_path: Path) -> None:
    assert not TokenStore().configured and not TokenStore(SecretStr("")).configured
    store = TokenStore(None, write(tmp_path / "t.json", {"tokens": [
        {"name": "wall", "role": "viewer", "sha256": H("w")}]}))
    assert store.configured and not store.has_operator


@pytest.mark.parametrize(("doc", "message"), [
    ({"tokens": [{"name": "a", "role": "ev", "sha256": H("a")}]}, "needs ev_ids or ev_pattern"),
    ({"tokens": [{"name": "a", "role": "viewer", "ev_ids": ["EV_1"], "sha256": H("a")}]}, "only role ev"),
    ({"tokens": [{"name": "a", "role": "ev", "ev_ids": ["EV/1"], "sha256": H("a")}]}, "must match"),
    ({"tokens": [{"name": "a", "role": "ev", "ev_ids": ["balancer"], "sha256": H("a")}]}, "service account"),
    ({"tokens": [{"name": "a", "role": "ev", "ev_pattern": "EV_(", "sha256": H("a")}]}, "not a regular"),
    ({"tokens": [{"name": "a", "role": "admin", "sha256": H("a")}]}, "role"),
    ({"tokens": [{"name": "a", "role": "viewer", "sha256": "plain-token"}]}, "sha256"),
    ({"tokens": [{"name": "a", "role": "viewer", "token": "x", "sha256": H("a")}]}, "token"),
    ({"tokens": [{"name": "a", "role": "viewer", "sha256": H("a")},
                 {"name": "a", "role": "viewer", "sha256": H("b")}]}, "names must be unique"),
    ({"tokens": [{"name": "a", "role": "viewer", "sha256": H("a")},
                 {"name": "b", "role": "viewer", "sha256": H("a")}]}, "listed twice"),
])
def test_an_invalid_file_is_refused_with_the_reason(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        TokenStore(None, write(tmp_path / "t.json", doc))


def test_unreadable_or_not_json_or_the_operator_token_again(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenStore(None, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenFileError, match=r"bad\.json"):
        TokenStore(None, tmp_path / "bad.json")
    with pytest.raises(TokenFileError, match="same as API_TOKEN"):
        TokenStore(SecretStr("op"), write(tmp_path / "t.json", {"tokens": [
            {"name": "a", "role": "viewer", "sha256": H("op")}]}))


def test_the_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_old_tokens(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "t.json", {"tokens": [{"name": "a", "role": "viewer", "sha256": H("a")}]})
    store = TokenStore(None, path, clock=clock)
    assert store.authenticate("a") is not None and store.authenticate("b") is None
    write(path, {"tokens": [{"name": "b", "role": "viewer", "sha256": H("b")}]})
    os.utime(path, ns=(1, 1))  # a change the stat sees even within the file system's time resolution
    assert store.authenticate("b") is None  # checked at most once a second
    clock.now += 1.5
    assert store.authenticate("b") is not None and store.authenticate("a") is None
    path.write_text("{broken")
    clock.now += 1.5
    assert store.authenticate("b") is not None  # kept
    path.unlink()
    clock.now += 1.5
    assert store.authenticate("b") is not None  # a file removed by mistake does not lock everyone out


def test_write_keeps_only_hashes_and_is_private(tmp_path: Path) -> None:
    token = new_token()
    assert len(token) >= 43 and token != new_token()
    path = tmp_path / "t.json"
    write_token_file(path, TokenFile(tokens=[TokenEntry(name="e", role="ev", ev_ids=["EV_1"], sha256=H(token))]))
    assert token not in path.read_text() and H(token) in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path).tokens[0].ev_ids == ["EV_1"]


def test_cli_adds_lists_and_removes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.json"
    assert main(["add", str(path), "--name", "EV_1234", "--role", "ev", "--ev-id", "EV_1234"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["add", str(path), "--name", "cp", "--role", "ev", "--ev-pattern", "CP_[0-9]{4}"]) == 0
    capsys.readouterr()
    store = TokenStore(None, path)
    principal = store.authenticate(token)
    assert principal is not None and principal.name == "EV_1234" and principal.may_act_for("EV_1234")
    assert token not in path.read_text()
    assert main(["list", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "EV_1234\tev\tEV_1234" in listing and "cp\tev\tids matching /CP_[0-9]{4}/" in listing
    assert main(["add", str(path), "--name", "bad", "--role", "ev"]) == 2  # no scope
    assert "ev_ids or ev_pattern" in capsys.readouterr().err
    assert main(["remove", str(path), "--name", "EV_1234"]) == 0
    assert main(["remove", str(path), "--name", "EV_1234"]) == 1
    assert TokenStore(None, path).authenticate(token) is None


def test_the_api_refuses_to_start_with_a_token_file_it_cannot_use(tmp_path: Path) -> None:
    """``python -m api`` with a broken API_TOKENS_FILE says why and exits 2 before it listens."""
    import subprocess
    import sys

    bad = write(tmp_path / "t.json", {"tokens": [{"name": "a", "role": "ev", "sha256": H("a")}]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "MQTT_"))}
    env.update(API_TOKENS_FILE=str(bad), API_PORT="0", MQTT_PORT="1", PYTHONPATH=str(Path(__file__).parents[2]))
    result = subprocess.run([sys.executable, "-m", "api"], env=env, capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).parents[2], check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid configuration" in result.stderr and "needs ev_ids or ev_pattern" in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
