"""Minting bearer tokens (HS-family JWT, pinned algorithm, `kid` header): see
`fedllm.common.identity.mint_token`, re-exported here for the gateway."""

from __future__ import annotations

from fedllm.common.identity import ISSUER, mint_token

__all__ = ["ISSUER", "mint_token"]
