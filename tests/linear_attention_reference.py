"""The library's linear attention written out step by step: the reference that
unet.linear_attention and the fused kernels are tested against."""

import jax
import jax.numpy as jnp


def by_concatenation(q, k, v, mem_kv, scale):
  """The library's steps literally: memory slots concatenated, then both softmaxes."""
  b = k.shape[0]
  mem = jnp.broadcast_to(mem_kv[:, None], (2, b) + mem_kv.shape[1:])
  k = jax.nn.softmax(jnp.concatenate([mem[0], k], axis=1), axis=1)
  v = jnp.concatenate([mem[1], v], axis=1)
  q = jax.nn.softmax(q, axis=-1) * scale
  context = jnp.einsum('bnhd,bnhe->bhde', k, v)
  return jnp.einsum('bhde,bnhd->bnhe', context, q)


def as_the_library_groups_it(q, k, y, w_v, w_out, mem_kv, scale):
  """v = y w_v, the concatenated attention, then the output projection over (head, e)."""
  v = jnp.einsum('bnc,che->bnhe', y, w_v)
  out = by_concatenation(q, k, v, mem_kv, scale)
  return jnp.einsum('bnhe,hef->bnf', out, w_out)
