"""Where training and evaluation run: ``cpu``, ``cuda`` or ``auto``.

A client's ``client.device`` and the server's ``server_device`` take one of
:data:`DEVICES`. ``auto`` follows the GPUs this process was given and
otherwise stays on the CPU: a simulated client uses the GPU its worker process
(``mode.backend=process``) or Ray (``mode.backend=ray``) assigned it
(``mode.client_num_gpus > 0``), a SuperNode's ``flwr-clientapp`` has none
assigned, and the server counts every GPU its process sees. ``cuda`` asks for a GPU whatever was assigned and fails where
there is none. :func:`resolve_device` is the rule, a pure function;
:func:`client_device` and :func:`server_device` feed it what this process sees.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

DEVICES = ("auto", "cpu", "cuda")

ASSIGNED_GPUS_ENV = "FEDPRIV_ASSIGNED_GPUS"
"""Comma-separated GPU ids the process backend gave a worker process."""


def resolve_device(setting: str, *, key: str, cuda_available: bool, assigned_gpus: Sequence) -> torch.device:
    """The device a ``setting`` of :data:`DEVICES` means in this process.

    Parameters
    ----------
    setting : str
        ``auto``, ``cpu`` or ``cuda``.
    key : str
        The config key the setting came from, for the error message.
    cuda_available : bool
        Whether PyTorch can use a CUDA GPU here.
    assigned_gpus : Sequence
        The GPUs given to this process (Ray's ids for a simulated client).

    Returns
    -------
    torch.device
        ``cpu``, or ``cuda`` (the first visible GPU: Ray makes the assigned
        one the only visible one).

    Raises
    ------
    ValueError
        ``key='cuda'`` where PyTorch sees no CUDA GPU.
    """
    if setting == "cuda":
        if not cuda_available:
            raise ValueError(f"{key}='cuda': no CUDA GPU is available here (torch.cuda.is_available() is false)")
        return torch.device("cuda")
    if setting == "auto" and cuda_available and len(assigned_gpus) > 0:
        return torch.device("cuda")
    return torch.device("cpu")


def ray_assigned_gpus() -> tuple:
    """The GPU ids Ray assigned to this process; empty outside a Ray worker.

    Ray is looked up, not imported: a process that has not imported it (a
    SuperNode's ``flwr-clientapp``, ``scripts/bench.py``) is no Ray worker.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ()
    return tuple(ray.get_gpu_ids())


def assigned_gpus() -> tuple:
    """The GPU ids this client process was given: Ray's in a Ray worker, else the process backend's, else none."""
    given = ray_assigned_gpus()
    if given:
        return given
    listed = os.environ.get(ASSIGNED_GPUS_ENV, "")
    return tuple(int(gpu) for gpu in listed.split(",") if gpu.strip())


def client_device(setting: str) -> torch.device:
    """The device of ``client.device`` in this process (see :func:`resolve_device`)."""
    return resolve_device(
        setting, key="client.device", cuda_available=torch.cuda.is_available(), assigned_gpus=assigned_gpus()
    )


def server_device(setting: str) -> torch.device:
    """The device of ``server_device`` in this process: every visible GPU counts as assigned."""
    return resolve_device(
        setting,
        key="server_device",
        cuda_available=torch.cuda.is_available(),
        assigned_gpus=range(torch.cuda.device_count()),
    )
