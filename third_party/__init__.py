"""Adapters that run peer attention libraries as baselines (see README.md here).

  attention_peers()  name -> peer for dot_product_attention-style cases
  decode_peers()     name -> peer for one-token decode cases

In-process JAX peers (`peers.JaxPeer`) have `make(...)` returning a function to time; torch
peers (`torch_peers.TorchPeer`) have `run(case, arrays)` and measure in a child process.
Every peer has `available()`, falsy with a reason when it cannot run here.
"""

from __future__ import annotations

from typing import Any

from third_party import torch_peers
from third_party.peers import (Availability, JaxNnAttention, JaxNnDecode, JaxPeer,
                               PallasDecode, PallasTritonMha, PeerMask)
from third_party.torch_peers import TorchPeer


def attention_peers(interpret: bool = False) -> dict[str, Any]:
  """All attention peers by name; `interpret` runs the Pallas ones in interpret mode."""
  peers = [JaxNnAttention("cudnn"), JaxNnAttention("xla"), PallasTritonMha(interpret)]
  peers += [TorchPeer(name, "attention") for name in torch_peers.ATTENTION]
  return {p.name: p for p in peers}


def decode_peers(interpret: bool = False) -> dict[str, Any]:
  """All decode peers by name; `interpret` runs the Pallas ones in interpret mode."""
  peers = [JaxNnDecode("cudnn"), JaxNnDecode("xla"), PallasDecode(interpret)]
  peers += [TorchPeer(name, "decode") for name in torch_peers.DECODE]
  return {p.name: p for p in peers}


__all__ = ["Availability", "JaxNnAttention", "JaxNnDecode", "JaxPeer", "PallasDecode",
           "PallasTritonMha", "PeerMask", "TorchPeer", "attention_peers", "decode_peers"]
