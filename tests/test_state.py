"""Training-state files written on a GPU load on any device (issue 11 item 7: ``map_location``)."""

from __future__ import annotations

import torch

from kandinsky5.files import save_torch
from kandinsky5.train.state import Progress, capture_rng, read_state_dir, state_writers, write_state_dir


def test_a_state_saved_from_cuda_loads_onto_the_cpu(tmp_path, monkeypatch):
    """Every storage is tagged ``cuda:0`` as on a GPU run; without ``map_location`` loading would need that GPU
    (and, on a multi-GPU machine, put every rank's copy on cuda:0)."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    network = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    optimizer_files = {"optimizer.pt": lambda p: save_torch(optimizer.state_dict(), p)}
    rng = [capture_rng(torch.Generator())]
    writers = state_writers(network.state_dict(), optimizer_files, scheduler, Progress(1, 0, 1), rng, {})
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    write_state_dir(tmp_path / "state", writers)
    monkeypatch.undo()
    _, _, opt_state, _, rng = read_state_dir(tmp_path / "state")
    moments = opt_state["state"][0]["exp_avg"]
    assert moments.device.type == "cpu" and torch.equal(moments, optimizer.state[param]["exp_avg"])
    assert rng[0]["torch"].device.type == "cpu"
