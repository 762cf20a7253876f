"""Optional Hub downloads skip cleanly when offline."""

from tutorial_lib import hub


def test_unreachable_and_uncached_returns_none_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    calls = []

    def from_pretrained(name, local_files_only):
        calls.append(local_files_only)
        raise OSError("not in cache")

    assert hub.from_hub(from_pretrained, "org/model") is None
    assert calls == [True] and "Skipped" in capsys.readouterr().out


def test_reachable_loads(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    assert hub.from_hub(lambda name, local_files_only: (name, local_files_only), "org/m") == ("org/m", False)


def test_an_unresolvable_host_is_unreachable_not_an_error():
    assert hub.hub_reachable("hub.invalid", timeout=0.5) is False  # .invalid never resolves (RFC 2606)
