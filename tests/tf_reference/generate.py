"""Record reference trajectories of ``tf.train.ExponentialMovingAverage``.

Run once, on a machine where ``tensorflow-cpu`` is installed (it is NOT a
dependency of ``functional_ema`` nor of its test suite)::

    python tests/tf_reference/generate.py

It writes ``tf_float32.json``, ``tf_float64.json``, ``tf_float16.json`` and
``tf_bfloat16.json`` next to this file.  ``tests/test_tf_parity.py`` replays
every trajectory with ``functional_ema`` (torch only) and demands bit-for-bit
equality.  The script is deterministic (every case draws from a numpy
generator seeded from the case name), so rerunning it with the same
TensorFlow version must reproduce the files byte for byte.

What is driven in TensorFlow (CPU, eager, no XLA, no ``tf.function``), see
``tensorflow/python/training/moving_averages.py``:

* ``mode == "variable"`` (TF2): one ``tf.Variable`` per leaf and
  ``ExponentialMovingAverage(decay=decay_var, num_updates=num_updates_var)``
  where ``decay_var`` is a float32 ``tf.Variable`` (assigned the step's Python
  float before each ``apply``, so the decay may change every step) and
  ``num_updates_var`` an int64 ``tf.Variable`` (or ``num_updates=None``).
  Step 0 calls ``ema.apply`` once on the initial values: this creates the
  shadows, initialised to the variables' values, and runs one update that is
  a no-op (``shadow - (shadow - x) * c`` with ``shadow == x``); the shadow
  after it is recorded as ``"init"`` (the script checks that it equals the
  initial values bit for bit).  Then for t = 1..T: assign x_t to the
  variables, assign the step's decay (and num_updates), ``ema.apply``, record
  ``ema.average(v)``.
* ``mode == "zero_debias"`` (TF1 graph mode, ``tf.Graph().as_default()`` with
  ``tf.compat.v1`` APIs and a ``tf.compat.v1.Session``): the values are
  ``tf.compat.v1.placeholder`` tensors and the EMA is built with
  ``zero_debias=True``, which TF honours only for non-Variable tensors: the
  shadow is created zero-initialised together with the internal ``biased``
  and ``local_step`` variables (both of the leaf's dtype).  There is no init
  step: the values fed at t = 1 are the first update.  The decay is either a
  Python float constant given to the constructor or a float32 placeholder fed
  every step; num_updates (when used) is an int64 placeholder fed every step.

TF's update, per step (``decay`` and ``num_updates`` as recorded)::

    d = float32(decay)
    if num_updates is not None:
        n = float32(num_updates)                  # int64 -> float32 cast
        d = min(d, (1 + n) / (10 + n))            # float32 arithmetic
    c = cast(float32(1) - d, leaf_dtype)          # rounded in float32 first
    # variable mode
    shadow = shadow - (shadow - x) * c            # leaf dtype, op by op
    # zero_debias mode
    biased = biased - (biased - x) * c
    local_step = local_step + 1                   # leaf dtype
    shadow = biased / (1 - pow(1 - c, local_step))  # 0-dim pow: C library

The bias factor is a 0-dim tensor, so TF evaluates ``pow`` with its scalar
kernel, which equals the C library's ``pow``/``powf`` (float16/bfloat16
through float32) away from underflow; TF's vectorised Pow kernel and
``np.power`` both differ from it in the last bit for some inputs.

Values are random walks drawn in float64 (x_t = x_{t-1} + noise) with a
different magnitude per leaf (about 1e-2, 1, 1e2, 1e3) and converted to the
leaf dtype by ``tf.cast`` from float64, so rounding matters.  TF's CPU
runtime flushes float32 (and bfloat16, whose arithmetic is done in float32)
subnormals to zero; ``functional_ema`` does not copy that, so the data are
chosen to keep every float32/bfloat16 value and intermediate far from the
subnormal range (the script checks this with a numpy emulation of the
formulas above and reports any disagreement with TF).  float16 subnormals
are *not* flushed by TF (half arithmetic goes through float32, where they
are normal numbers), and do occur in the float16 fixtures.

Fixture format (one JSON file per dtype)::

    {"tensorflow_version": ..., "generator": "tests/tf_reference/generate.py",
     "dtype": "bfloat16", "cases": [
        {"name": ..., "mode": "variable" | "zero_debias",
         "decay": [python float per step t=1..T, exactly as given to TF],
         "num_updates": [int per step t=1..T] or null,
         "leaves": {name: {"shape": [...], "init": HEX or null,
                           "values": [HEX per step], "average": [HEX per step]}}}]}

where HEX is ``array.tobytes().hex()`` of the little-endian raw bits of the
array in its dtype (the 2-byte bit patterns for float16 and bfloat16).
"""

import ctypes
import ctypes.util
import json
import math
import os
import platform
import sys
import zlib

import ml_dtypes
import numpy as np
import tensorflow as tf


HERE = os.path.dirname(os.path.abspath(__file__))

DTYPES = {
    "float32": (tf.float32, np.dtype(np.float32)),
    "float64": (tf.float64, np.dtype(np.float64)),
    "float16": (tf.float16, np.dtype(np.float16)),
    "bfloat16": (tf.bfloat16, np.dtype(ml_dtypes.bfloat16)),
}
BITS = {2: "<u2", 4: "<u4", 8: "<u8"}

# (leaf name, shape, magnitude)
LEAVES = [
    ("scalar", (), 1e-2),
    ("vec", (3,), 1.0),
    ("mat", (4, 5), 1e2),
    ("cube", (2, 3, 4), 1e3),
]

# Stable order of the case names; the parity test asserts exactly this set.
CASE_NAMES = [
    "const",
    "const_low",
    "num_updates_from_zero",
    "num_updates_large",
    "num_updates_reset",
    "num_updates_beyond_2_24",
    "per_step_decay",
    "zero_debias_const",
    "zero_debias_const_high",
    "zero_debias_num_updates",
    "zero_debias_per_step_decay",
]


def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def shuffled(rng, items):
    items = list(items)
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def case_specs():
    """Decay / num_updates schedules (Python floats and ints) per case."""
    specs = []

    def add(name, mode, decay, num_updates=None, const_decay=False):
        if num_updates is not None:
            assert len(num_updates) == len(decay)
        specs.append(
            {
                "name": name,
                "mode": mode,
                "decay": [float(d) for d in decay],
                "num_updates": None if num_updates is None else [int(n) for n in num_updates],
                "const_decay": const_decay,
            }
        )

    T = 40
    add("const", "variable", [0.999] * T)
    add("const_low", "variable", [0.9] * T)
    # Warmup min(decay, (1+n)/(10+n)) is the smaller one for the whole run.
    add("num_updates_from_zero", "variable", [0.9999] * T, list(range(T)))
    # (1+n)/(10+n) crosses 0.99122 at n ~= 1015: both branches of min().
    add("num_updates_large", "variable", [0.99122] * T, list(range(1000, 1000 + T)))
    add("num_updates_reset", "variable", [0.999] * T, list(range(16)) + list(range(T - 16)))
    # float32(0.99999999) == 1.0, so the warmup term always wins; around
    # 2**24 the int64 -> float32 cast of n rounds (ties to even).
    big = [
        *range(2**24 - 5, 2**24 + 21),
        *[123456789, 2**31 - 1, 2**31 + 7, 2**33 + 1, 10**12 + 1, 2**53 + 1, 2**62 + 12345],
    ]
    add("num_updates_beyond_2_24", "variable", [0.99999999] * len(big), big)

    rng = rng_for("per_step_decay/decays")
    mix = (
        [1.0] * 5
        + [0.0] * 5
        + [0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999] * 2
        + list(rng.uniform(0.0, 1.0, size=18))
    )
    add("per_step_decay", "variable", shuffled(rng, mix))

    add("zero_debias_const", "zero_debias", [0.9] * T, const_decay=True)
    add("zero_debias_const_high", "zero_debias", [0.99] * T, const_decay=True)
    # decay fed through a float32 placeholder, num_updates through int64 one.
    add("zero_debias_num_updates", "zero_debias", [0.9999] * T, list(range(T)))
    # No decay 1.0 here (nor decays so close to 1 that 1 - c rounds to 1 in
    # bfloat16): TF would divide by a zero bias factor.
    rng = rng_for("zero_debias_per_step_decay/decays")
    mix = [0.0] * 4 + [0.5, 0.9, 0.95, 0.99] * 2 + list(rng.uniform(0.0, 0.99, size=28))
    add("zero_debias_per_step_decay", "zero_debias", shuffled(rng, mix))

    assert [s["name"] for s in specs] == CASE_NAMES
    return specs


def random_walks(name, steps):
    """float64 values x_0..x_steps per leaf."""
    rng = rng_for(name + "/values")
    out = {}
    for leaf, shape, mag in LEAVES:
        x = mag * (1.0 + 0.5 * rng.standard_normal(shape))
        walk = [x]
        for _ in range(steps):
            x = x + 0.05 * mag * rng.standard_normal(shape)
            walk.append(x)
        out[leaf] = walk
    return out


def to_hex(arr, npdt):
    arr = np.ascontiguousarray(np.asarray(arr))
    assert arr.dtype == npdt, (arr.dtype, npdt)
    return arr.view(np.dtype(BITS[npdt.itemsize])).astype(BITS[npdt.itemsize]).tobytes().hex()


def tf_cast_values(walk, tfdt, npdt):
    vals = [tf.cast(tf.constant(x, dtype=tf.float64), tfdt).numpy() for x in walk]
    for v in vals:
        assert v.dtype == npdt
    return vals


# ---------------------------------------------------------------------------
# numpy emulation of TF's formulas, only used as a self-check


def emulated_decay(decay, n):
    d = np.float32(decay)
    if n is not None:
        nf = np.array(n, np.int64).astype(np.float32)
        w = (np.float32(1) + nf) / (np.float32(10) + nf)
        d = np.minimum(d, w)
    return np.float32(np.float32(1) - d)


_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
_LIBM.powf.restype = ctypes.c_float
_LIBM.powf.argtypes = [ctypes.c_float, ctypes.c_float]


def scalar_pow(base, exp, npdt):
    """TF's Pow on 0-dim tensors: the C library's scalar pow/powf (half types
    through float32).  NOT np.power, which is vectorised (SVML) and differs in
    the last bit; TF's own vectorised Pow kernel differs from both."""
    if npdt == np.dtype(np.float64):
        return np.float64(math.pow(float(base), float(exp)))
    return npdt.type(np.float32(_LIBM.powf(float(base), float(exp))))


def has_subnormal(a):
    a = np.asarray(a, np.float64)
    tiny = float(np.finfo(np.float32).tiny)
    return bool(np.any((a != 0) & (np.abs(a) < tiny)))


class Emulator:
    def __init__(self, npdt, zero_debias, init=None, template=None):
        self.npdt = npdt
        self.zd = zero_debias
        self.subnormal = False
        if zero_debias:
            self.biased = {k: np.zeros_like(v) for k, v in template.items()}
            self.step = npdt.type(0)
            self.shadow = {k: np.zeros_like(v) for k, v in template.items()}
        else:
            self.shadow = {k: v.copy() for k, v in init.items()}

    def _check(self, *xs):
        # TF flushes float32 subnormals (bfloat16 arithmetic runs in float32)
        if self.npdt in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
            self.subnormal |= any(has_subnormal(x) for x in xs)

    def update(self, values, decay, n):
        t = self.npdt.type
        c32 = emulated_decay(decay, n)
        c = c32.astype(self.npdt)
        if self.zd:
            self.step = t(self.step + t(1))
            bias = t(t(1) - scalar_pow(t(t(1) - c), self.step, self.npdt))
            for k, x in values.items():
                diff = self.biased[k] - x
                prod = diff * c
                self.biased[k] = self.biased[k] - prod
                self.shadow[k] = self.biased[k] / bias
                self._check(diff, prod, self.biased[k], self.shadow[k], bias)
        else:
            for k, x in values.items():
                diff = self.shadow[k] - x
                prod = diff * c
                self.shadow[k] = self.shadow[k] - prod
                self._check(diff, prod, self.shadow[k])
        return self.shadow


# ---------------------------------------------------------------------------


def run_variable_case(spec, tfdt, npdt):
    decays, nus = spec["decay"], spec["num_updates"]
    T = len(decays)
    walks = random_walks(spec["name"], T)
    vals = {k: tf_cast_values(w, tfdt, npdt) for k, w in walks.items()}
    names = [leaf for leaf, _, _ in LEAVES]

    variables = {k: tf.Variable(vals[k][0], name=k) for k in names}
    var_list = [variables[k] for k in names]
    decay_var = tf.Variable(decays[0], dtype=tf.float32, name="decay")
    nu_var = None
    if nus is not None:
        nu_var = tf.Variable(nus[0], dtype=tf.int64, name="num_updates")
    ema = tf.train.ExponentialMovingAverage(decay=decay_var, num_updates=nu_var)
    ema.apply(var_list)  # step 0: creates the shadows (+ a no-op update)
    init = {k: ema.average(variables[k]).numpy() for k in names}
    for k in names:
        if to_hex(init[k], npdt) != to_hex(vals[k][0], npdt):
            raise AssertionError(f"first apply is not a no-op for {k}")

    emu = Emulator(npdt, False, init=init)
    leaves = {
        k: {
            "shape": list(variables[k].shape),
            "init": to_hex(init[k], npdt),
            "values": [],
            "average": [],
        }
        for k in names
    }
    mismatches = []
    for t in range(1, T + 1):
        for k in names:
            variables[k].assign(vals[k][t])
        decay_var.assign(decays[t - 1])
        if nu_var is not None:
            nu_var.assign(nus[t - 1])
        ema.apply(var_list)
        emu_avg = emu.update(
            {k: vals[k][t] for k in names}, decays[t - 1], None if nus is None else nus[t - 1]
        )
        for k in names:
            x = variables[k].numpy()
            avg = ema.average(variables[k]).numpy()
            assert to_hex(x, npdt) == to_hex(vals[k][t], npdt)
            leaves[k]["values"].append(to_hex(x, npdt))
            leaves[k]["average"].append(to_hex(avg, npdt))
            if to_hex(avg, npdt) != to_hex(emu_avg[k], npdt):
                mismatches.append((t, k))
            if not np.all(np.isfinite(avg.astype(np.float64))):
                raise AssertionError(f"non-finite average at t={t} leaf {k}")
            emu_avg[k] = avg.copy()  # keep emulation on TF's trajectory
    return leaves, mismatches, emu.subnormal


def run_zero_debias_case(spec, tfdt, npdt):
    decays, nus = spec["decay"], spec["num_updates"]
    T = len(decays)
    walks = random_walks(spec["name"], T)
    # x_0 of the walk is not used: the first fed value is x_1.
    vals = {k: tf_cast_values(w, tfdt, npdt) for k, w in walks.items()}
    names = [leaf for leaf, _, _ in LEAVES]
    shapes = {leaf: shape for leaf, shape, _ in LEAVES}

    g = tf.Graph()
    with g.as_default():
        phs = {k: tf.compat.v1.placeholder(tfdt, shape=shapes[k], name=k) for k in names}
        if spec["const_decay"]:
            assert len(set(decays)) == 1
            decay_in = decays[0]  # Python float constant
            decay_ph = None
        else:
            decay_ph = tf.compat.v1.placeholder(tf.float32, shape=[], name="decay")
            decay_in = decay_ph
        nu_ph = None
        if nus is not None:
            nu_ph = tf.compat.v1.placeholder(tf.int64, shape=[], name="num_updates")
        ema = tf.compat.v1.train.ExponentialMovingAverage(
            decay_in, num_updates=nu_ph, zero_debias=True
        )
        update_op = ema.apply([phs[k] for k in names])
        avgs = {k: ema.average(phs[k]) for k in names}
        for k in names:
            assert avgs[k] is not None
        # zero_debias really is in effect: biased/local_step variables exist.
        gv = [v.name for v in tf.compat.v1.global_variables()]
        assert any("biased" in n for n in gv), gv
        assert any("local_step" in n for n in gv), gv
        init_op = tf.compat.v1.global_variables_initializer()
        leaves = {
            k: {"shape": list(shapes[k]), "init": None, "values": [], "average": []} for k in names
        }
        emu = Emulator(npdt, True, template={k: vals[k][1] for k in names})
        mismatches = []
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(init_op)
            start = sess.run(avgs)
            for k in names:
                assert not np.any(start[k].astype(np.float64)), "not zero-initialised"
            for t in range(1, T + 1):
                feed = {phs[k]: vals[k][t] for k in names}
                if decay_ph is not None:
                    feed[decay_ph] = decays[t - 1]
                if nu_ph is not None:
                    feed[nu_ph] = nus[t - 1]
                sess.run(update_op, feed_dict=feed)
                out = sess.run(avgs)
                emu_avg = emu.update(
                    {k: vals[k][t] for k in names},
                    decays[t - 1],
                    None if nus is None else nus[t - 1],
                )
                for k in names:
                    avg = out[k]
                    assert avg.dtype == npdt
                    leaves[k]["values"].append(to_hex(vals[k][t], npdt))
                    leaves[k]["average"].append(to_hex(avg, npdt))
                    if to_hex(avg, npdt) != to_hex(emu_avg[k], npdt):
                        mismatches.append((t, k))
                    if not np.all(np.isfinite(avg.astype(np.float64))):
                        raise AssertionError(f"non-finite average at t={t} leaf {k}")
    return leaves, mismatches, emu.subnormal


def main():
    tf.config.optimizer.set_jit(False)
    tf.config.set_visible_devices([], "GPU")
    assert tf.executing_eagerly()
    if sys.byteorder != "little":
        raise SystemExit("run this on a little-endian machine")
    specs = case_specs()
    ok = True
    for dname, (tfdt, npdt) in DTYPES.items():
        cases = []
        for spec in specs:
            if spec["mode"] == "variable":
                leaves, mism, sub = run_variable_case(spec, tfdt, npdt)
            else:
                leaves, mism, sub = run_zero_debias_case(spec, tfdt, npdt)
            assert tf.executing_eagerly()
            if mism or sub:
                ok = False
            print(
                f"{dname:9s} {spec['name']:28s} steps={len(spec['decay']):3d}"
                f" numpy-emulation mismatches={len(mism)}"
                f"{' first=' + str(mism[0]) if mism else ''}"
                f"{' SUBNORMAL(f32 range)' if sub else ''}"
            )
            cases.append(
                {
                    "name": spec["name"],
                    "mode": spec["mode"],
                    "decay": spec["decay"],
                    "num_updates": spec["num_updates"],
                    "leaves": leaves,
                }
            )
        doc = {
            "tensorflow_version": tf.__version__,
            "generator": "tests/tf_reference/generate.py",
            "dtype": dname,
            "numpy_version": np.__version__,
            "platform": f"{platform.system()} {platform.machine()}",
            "cases": cases,
        }
        path = os.path.join(HERE, f"tf_{dname}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    if not ok:
        print(
            "WARNING: TF disagrees with the numpy emulation somewhere "
            "(fixtures still hold TF's own results)"
        )


if __name__ == "__main__":
    main()
