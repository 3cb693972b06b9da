"""The memory traffic of a compiled XLA program's kernels, read from its optimised HLO
text (`compiled.as_text()`, or the `*after_optimizations.txt` of an XLA dump).

Each kernel (a fusion, a library call such as cuDNN's convolutions, a Pallas call) is
charged its results' and operands' full sizes, once: what it must read from and write
to memory when nothing stays in cache between kernels, a floor for its time at the
card's bandwidth. The exception is a fusion operand that only feeds slices (through
elementwise ops): it is charged the elements the slices keep.

Used by bench/gpu_compile.py (a GPU program's bytes, compiled without a GPU) and
bench/profile.py (each profiled kernel's bytes against its measured time).
"""

import collections
import math
import re

from bench import roofline

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
# HLO instructions that launch nothing: aliases, bookkeeping and inputs.
_NOT_KERNELS = {'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant',
                'after-all', 'partition-id', 'replica-id'}


def _arrays(shape_text: str):
  """(dtype, element count) of each array in an HLO shape such as 'bf16[8,16]{1,0}' or a
  tuple of them."""
  for dtype, dims in re.findall(r'\b(\w+)\[([\d,]*)\]', shape_text):
    yield dtype, math.prod(int(d) for d in filter(None, dims.split(',')))


def _bytes_of(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape."""
  return sum(_DTYPE_BYTES.get(dtype, 0) * count for dtype, count in _arrays(shape_text))


_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:, |$)')
# Ops that map each element of their operands to one element of their result, so a slice
# after them reads only the operand elements it keeps.
_ELEMENTWISE = {'abs', 'add', 'bitcast', 'compare', 'convert', 'divide', 'exponential',
                'log', 'logistic', 'maximum', 'minimum', 'multiply', 'negate', 'rsqrt',
                'select', 'sqrt', 'subtract', 'tanh'}


def _sliced_reads(body: str) -> dict[int, int]:
  """For a fused computation's text: parameter number -> the bytes the kernel reads of
  it, for each parameter that reaches slices only, through elementwise ops (the kernel
  then reads only the elements the slices keep, e.g. one pixel of a GroupNorm input)."""
  ops, users, params = {}, collections.defaultdict(list), {}
  for line in body.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape_text, opcode, operands = match.groups()
    ops[name] = (opcode, shape_text)
    for operand in re.findall(r'%([\w.\-]+)', operands):
      users[operand].append(name)
    if opcode == 'parameter':
      params[int(operands)] = (name, _DTYPE_BYTES.get(shape_text.split('[')[0], 0))

  def kept_elements(name):  # None: some use reads the elements in full.
    if not users[name]:
      return None
    total = 0
    for user in users[name]:
      opcode, shape_text = ops[user]
      if opcode == 'slice':
        total += sum(count for _, count in _arrays(shape_text))
      elif opcode in _ELEMENTWISE and (kept := kept_elements(user)) is not None:
        total += kept
      else:
        return None
    return total

  reads = {}
  for number, (name, element_bytes) in params.items():
    kept = kept_elements(name)
    if kept is not None:
      reads[number] = kept * element_bytes
  return reads


def kernels(hlo_text: str) -> list[dict]:
  """The ENTRY computation's kernels in program order, as dicts: name (the HLO
  instruction's, 'input_reduce_fusion.3'), kind (fusion name without its number, or
  custom-call target), bytes (read and written, as the module docstring counts them),
  op_name (the JAX name stack it came from, '' if none) and layer (`roofline.layer_kind`
  of op_name)."""
  computations = {m.group(1): m.group(2) for m in re.finditer(
      r'^%(\S+) \(.*?\n(.*?)\n}', hlo_text, re.MULTILINE | re.DOTALL)}
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  sizes, found = {}, []
  for line in entry.splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape_text, opcode, operands = match.groups()
    sizes[name] = _bytes_of(shape_text)
    if opcode in _NOT_KERNELS:
      continue
    target = re.search(r'custom_call_target="([^"]*)"', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r'calls=%([\w.\-]+)', line)
    sliced = (_sliced_reads(computations.get(called.group(1), ''))
              if opcode == 'fusion' and called else {})
    kind = (target.group(1) if target else
            re.sub(r'[.\d]+$', '', name) if opcode == 'fusion' else opcode)
    reads = sum(sliced.get(i, sizes.get(o, 0))
                for i, o in enumerate(re.findall(r'%([\w.\-]+)', operands)))
    op_name = op_name.group(1) if op_name else ''
    found.append(dict(name=name, kind=kind, bytes=sizes[name] + reads, op_name=op_name,
                      layer=roofline.layer_kind(op_name)))
  return found


