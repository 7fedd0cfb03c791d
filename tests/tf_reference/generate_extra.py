"""Record TensorFlow's remaining moving-average pieces for ``tests/test_tf_extend.py``.

Run once, on a machine where ``tensorflow-cpu`` and ``ml_dtypes`` are installed (neither is
a dependency of ``functional_ema`` nor of its tests)::

    python tests/tf_reference/generate_extra.py

It writes ``extra_ops.json`` next to this file (``generate.py`` and its ``tf_<dtype>.json``
fixtures are untouched; this script only borrows its helpers). Deterministic: every case
draws from a numpy generator seeded from its name, so rerunning it with the same TensorFlow
version reproduces the file byte for byte. Every trajectory is also checked against a numpy
emulation of the formulas below, and the script fails if TF disagrees with it or if a
float32 value comes near the subnormal range (which TF's CPU runtime flushes to zero).

What is driven in TensorFlow (CPU, no XLA), ``tensorflow/python/training/moving_averages.py``:

* ``extend`` (``mode == "variable"``, TF 2 eager): variables A (``a.w``, ``a.b``) and B
  (``b.w``, ``b.s``); ``ema = ExponentialMovingAverage(decay)`` with a Python float
  ``decay``; ``ema.apply(A)`` at t = 0 (shadows at the values), ``ema.apply(A)`` at
  t = 1..K, then ``ema.apply(A + B)`` at t = K+1..T: its first call creates B's shadows at
  B's values at t = K+1 (recorded as B's ``init``) and updates every shadow. A's shadows
  continue; nothing restarts.
* ``extend`` (``mode == "zero_debias"``, TF1 graph with placeholders and
  ``zero_debias=True``): the op ``ema.apply(A)`` run at t = 1..K, then the op
  ``ema.apply(A + B)`` (``second_apply == "all"``) or ``ema.apply(A)`` grouped with
  ``ema.apply(B)`` (``"new"``) run at t = K+1..T. B's shadow, ``biased`` and ``local_step``
  start at zero. With ``"new"`` A's zero-debias slots continue; with ``"all"`` TF updates
  A's shadow as a plain average from then on (``apply`` decides ``zero_debias`` only for
  the shadows it creates), from its debiased value.
* ``assign`` (``assign_moving_average(variable, value, decay, zero_debias)`` called
  directly, as TF1-era batch-norm code does for its moving statistics; in TF 2 it is
  ``tf.__internal__.train.assign_moving_average``), on values drawn independently around
  their mean, as batch statistics are. ``decay_kind == "python"`` (every float dtype): a
  Python float decay per step, TF 2 eager, ``zero_debias=False``:
  ``c = cast(f32(1.0 - decay), dtype)``, ``1.0 - decay`` being Python's float64
  subtraction. ``decay_kind == "float64"`` (float32 and float64 variables): the decay a
  float64 tensor, ``c = cast(1 - decay, dtype)`` computed in float64. ``zero_debias=True``:
  TF1 graph (in TF 2 eager every call creates new ``biased`` and ``local_step`` variables,
  so the "average" is just the value), one op built with a Python float decay and run T
  times; the variable starts at zero.
* ``weighted`` (``weighted_moving_average(value, decay, weight)``, TF1 graph, Python float
  decay; in TF 2 eager each call creates new variables, so its result is the value): two
  zero-initialised averages, of ``value * weight`` and of ``weight``, both by
  ``assign_moving_average(..., zero_debias=False)``, and their quotient.
* ``restore_names`` (TF1 graph): ``average_name`` and ``variables_to_restore`` (all, and a
  subset through ``moving_avg_variables``) for a model with averaged trainable variables,
  an averaged frozen one, a trainable one that is not averaged, and ``global_step``.

Fixture format: ``{"tensorflow_version", "generator", "numpy_version", "platform",
"extend": [case], "assign": [case], "weighted": [case], "restore_names": {...}}``; each
case has ``name``, ``dtype``, its schedule and ``leaves: {name: {"shape", "init",
"values", "average"}}`` with the raw little-endian bits of each array as hex, as in
``generate.py``.
"""

import json
import os
import platform
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.training import moving_averages


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from generate import (  # noqa: E402  (generate.py sits next to this script)
    DTYPES,
    has_subnormal,
    rng_for,
    scalar_pow,
    tf_cast_values,
    to_hex,
)


A_LEAVES = [("a.w", (2, 3), 1.0), ("a.b", (3,), 1e-2)]
B_LEAVES = [("b.w", (3, 2), 1e2), ("b.s", (), 1.0)]
ASSIGN_LEAVES = [("v", (16,), 1.0)]

EXTEND_DTYPES = ["float32", "float64"]
ASSIGN_DTYPES = ["float32", "float64", "float16", "bfloat16"]
WEIGHTED_DTYPES = ["float32", "float64"]

# Per-step Python float decays for assign_moving_average: the usual nines, decays below
# 0.5 (where 1.0 - decay rounds in float64 too), and the ends of the range.
ASSIGN_DECAYS = [0.999, 0.9, 0.99, 0.9999, 0.3, 0.0, 0.999, 1.0, 0.123, 0.95]


def walks(name, leaves, steps):
    """float64 random walks x_0..x_steps per leaf (as generate.py draws them)."""
    rng = rng_for(name + "/values")
    out = {}
    for leaf, shape, mag in leaves:
        x = mag * (1.0 + 0.5 * rng.standard_normal(shape))
        walk = [x]
        for _ in range(steps):
            x = x + 0.05 * mag * rng.standard_normal(shape)
            walk.append(x)
        out[leaf] = walk
    return out


def draws(name, leaves, steps):
    """float64 values x_0..x_steps per leaf, drawn independently around the leaf's magnitude
    (like the batch statistics assign_moving_average usually averages)."""
    rng = rng_for(name + "/values")
    return {
        leaf: [mag * (1.0 + 0.5 * rng.standard_normal(shape)) for _ in range(steps + 1)]
        for leaf, shape, mag in leaves
    }


def weight_apply(decay, npdt):
    return np.float32(np.float32(1) - np.float32(decay)).astype(npdt)


def weight_assign(decay, npdt, kind="python"):
    if kind == "float64":
        return np.float64(np.float64(1) - np.float64(decay)).astype(npdt)
    return np.float32(1.0 - decay).astype(npdt)


class Check:
    """The numpy emulation's verdicts, collected over the run."""

    def __init__(self):
        self.problems = []

    def equal(self, where, got, emulated, npdt):
        if to_hex(got, npdt) != to_hex(np.asarray(emulated, npdt), npdt):
            self.problems.append(f"{where}: TF differs from the numpy emulation")

    def normal(self, where, npdt, *arrays):
        if npdt == np.dtype(np.float32) and any(has_subnormal(a) for a in arrays):
            self.problems.append(f"{where}: float32 subnormal")


def step(shadow, x, c):
    diff = shadow - x
    return shadow - diff * c, diff, diff * c


# --------------------------------------------------------------------------- extend


def extend_variable(name, dname, decay, k, steps, check):
    tfdt, npdt = DTYPES[dname]
    leaves = A_LEAVES + B_LEAVES
    vals = {n: tf_cast_values(w, tfdt, npdt) for n, w in walks(name, leaves, steps).items()}
    a_names = [n for n, _, _ in A_LEAVES]
    b_names = [n for n, _, _ in B_LEAVES]
    variables = {n: tf.Variable(vals[n][0], name=n.replace(".", "_")) for n in a_names + b_names}
    ema = tf.train.ExponentialMovingAverage(decay)
    ema.apply([variables[n] for n in a_names])
    out = {
        n: {"shape": list(vals[n][0].shape), "init": None, "values": [], "average": []}
        for n in a_names + b_names
    }
    for n in a_names:
        out[n]["init"] = to_hex(ema.average(variables[n]).numpy(), npdt)
        check.equal(f"{name} init {n}", ema.average(variables[n]).numpy(), vals[n][0], npdt)
    emulated = {n: vals[n][0].copy() for n in a_names}
    c = weight_apply(decay, npdt)
    for t in range(1, steps + 1):
        live = a_names if t <= k else a_names + b_names
        for n in live:
            variables[n].assign(vals[n][t])
        if t == k + 1:
            assert all(ema.average(variables[n]) is None for n in b_names)
        ema.apply([variables[n] for n in live])
        if t == k + 1:
            for n in b_names:
                out[n]["init"] = to_hex(vals[n][t], npdt)  # the value the shadow starts at
                emulated[n] = vals[n][t].copy()
        for n in live:
            avg = ema.average(variables[n]).numpy()
            emulated[n], diff, prod = step(emulated[n], vals[n][t], c)
            check.equal(f"{name} t={t} {n}", avg, emulated[n], npdt)
            check.normal(f"{name} t={t} {n}", npdt, diff, prod, avg)
            out[n]["values"].append(to_hex(vals[n][t], npdt))
            out[n]["average"].append(to_hex(avg, npdt))
    return {
        "name": name,
        "mode": "variable",
        "dtype": dname,
        "decay": decay,
        "k": k,
        "steps": steps,
        "leaves": out,
    }


def extend_zero_debias(name, dname, decay, k, steps, second, check):
    """``second == "new"``: ``apply(B)`` as its own op, run with ``apply(A)``'s from K+1 on;
    ``second == "all"``: one op ``apply(A + B)`` from K+1 on, in which TF updates A's shadow
    as a plain average (``zero_debias`` is decided only for the shadows an apply creates)."""
    tfdt, npdt = DTYPES[dname]
    leaves = A_LEAVES + B_LEAVES
    vals = {n: tf_cast_values(w, tfdt, npdt) for n, w in walks(name, leaves, steps).items()}
    shapes = {n: s for n, s, _ in leaves}
    a_names = [n for n, _, _ in A_LEAVES]
    b_names = [n for n, _, _ in B_LEAVES]
    out = {
        n: {"shape": list(shapes[n]), "init": None, "values": [], "average": []}
        for n in a_names + b_names
    }
    emulated = {
        n: {"biased": np.zeros(shapes[n], npdt), "n": npdt.type(0), "shadow": None} for n in out
    }
    c = weight_apply(decay, npdt)
    g = tf.Graph()
    with g.as_default():
        phs = {
            n: tf.compat.v1.placeholder(tfdt, shape=shapes[n], name=n.replace(".", "_"))
            for n in out
        }
        ema = tf.compat.v1.train.ExponentialMovingAverage(decay, zero_debias=True)
        op_a = ema.apply([phs[n] for n in a_names])
        # Both ops are built before the session runs (a graph must not change after a run);
        # the second one's new slots are zeros until it first runs at t = K+1.
        before = set(tf.compat.v1.global_variables())
        if second == "new":
            op_b = tf.group(op_a, ema.apply([phs[n] for n in b_names]))
        else:
            op_b = ema.apply([phs[n] for n in a_names + b_names])
        new_vars = [v.name for v in tf.compat.v1.global_variables() if v not in before]
        assert len(new_vars) == 3 * len(b_names), new_vars  # shadow, biased, local_step
        assert all(v.startswith("b_") for v in new_vars), new_vars
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for t in range(1, steps + 1):
                live = a_names if t <= k else a_names + b_names
                op = op_a if t <= k else op_b
                sess.run(op, feed_dict={phs[n]: vals[n][t] for n in live})
                avgs = sess.run({n: ema.average(phs[n]) for n in live})
                for n in live:
                    e = emulated[n]
                    if second == "all" and t > k and n in a_names:
                        e["shadow"], diff, prod = step(e["shadow"], vals[n][t], c)
                        check.normal(f"{name} t={t} {n}", npdt, diff, prod)
                    else:
                        e["biased"], diff, prod = step(e["biased"], vals[n][t], c)
                        e["n"] = npdt.type(e["n"] + npdt.type(1))
                        one = npdt.type(1)
                        bias = npdt.type(one - scalar_pow(npdt.type(one - c), e["n"], npdt))
                        e["shadow"] = e["biased"] / bias
                        check.normal(f"{name} t={t} {n}", npdt, diff, prod, e["biased"])
                    check.equal(f"{name} t={t} {n}", avgs[n], e["shadow"], npdt)
                    check.normal(f"{name} t={t} {n}", npdt, avgs[n])
                    out[n]["values"].append(to_hex(vals[n][t], npdt))
                    out[n]["average"].append(to_hex(avgs[n], npdt))
    return {
        "name": name,
        "mode": "zero_debias",
        "second_apply": second,
        "dtype": dname,
        "decay": decay,
        "k": k,
        "steps": steps,
        "leaves": out,
    }


# --------------------------------------------------------------------------- assign


def assign_eager(name, dname, kind, decays, check):
    tfdt, npdt = DTYPES[dname]
    steps = len(decays)
    vals = {n: tf_cast_values(w, tfdt, npdt) for n, w in draws(name, ASSIGN_LEAVES, steps).items()}
    out = {}
    for n, w in vals.items():
        var = tf.Variable(w[0])
        leaf = {"shape": list(w[0].shape), "init": to_hex(w[0], npdt), "values": [], "average": []}
        emulated = w[0].copy()
        for t in range(1, steps + 1):
            d = decays[t - 1]
            decay = d if kind == "python" else tf.constant(d, dtype=tf.float64)
            tf.__internal__.train.assign_moving_average(
                var, tf.constant(w[t]), decay, zero_debias=False
            )
            avg = var.numpy()
            emulated, diff, prod = step(emulated, w[t], weight_assign(d, npdt, kind))
            check.equal(f"{name} t={t} {n}", avg, emulated, npdt)
            check.normal(f"{name} t={t} {n}", npdt, diff, prod, avg)
            leaf["values"].append(to_hex(w[t], npdt))
            leaf["average"].append(to_hex(avg, npdt))
        out[n] = leaf
    return {
        "name": name,
        "dtype": dname,
        "decay_kind": kind,
        "zero_debias": False,
        "decay": list(decays),
        "leaves": out,
    }


def assign_zero_debias(name, dname, decay, steps, check):
    tfdt, npdt = DTYPES[dname]
    vals = {n: tf_cast_values(w, tfdt, npdt) for n, w in draws(name, ASSIGN_LEAVES, steps).items()}
    out = {}
    c = weight_assign(decay, npdt)
    for n, w in vals.items():
        g = tf.Graph()
        with g.as_default():
            var = tf.compat.v1.get_variable(
                "v", initializer=tf.zeros(w[0].shape, tfdt), use_resource=True
            )
            ph = tf.compat.v1.placeholder(tfdt, shape=w[0].shape)
            op = tf.__internal__.train.assign_moving_average(var, ph, decay, zero_debias=True)
            names = {v.name for v in tf.compat.v1.global_variables()}
            assert {"v/biased:0", "v/local_step:0"} <= names, names
            leaf = {"shape": list(w[0].shape), "init": None, "values": [], "average": []}
            biased, count = np.zeros(w[0].shape, npdt), npdt.type(0)
            with tf.compat.v1.Session(graph=g) as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                for t in range(1, steps + 1):
                    sess.run(op, feed_dict={ph: w[t]})
                    avg = sess.run(var)
                    biased, diff, prod = step(biased, w[t], c)
                    count = npdt.type(count + npdt.type(1))
                    one = npdt.type(1)
                    bias = npdt.type(one - scalar_pow(npdt.type(one - c), count, npdt))
                    check.equal(f"{name} t={t} {n}", avg, biased / bias, npdt)
                    check.normal(f"{name} t={t} {n}", npdt, diff, prod, avg, biased)
                    leaf["values"].append(to_hex(w[t], npdt))
                    leaf["average"].append(to_hex(avg, npdt))
        out[n] = leaf
    return {
        "name": name,
        "dtype": dname,
        "decay_kind": "python",
        "zero_debias": True,
        "decay": [decay] * steps,
        "leaves": out,
    }


# --------------------------------------------------------------------------- weighted


def weighted(name, dname, decay, weight_shape, steps, check):
    tfdt, npdt = DTYPES[dname]
    value_shape = (4,)
    rng = rng_for(name + "/weights")
    vals = walks(name, [("value", value_shape, 1.0)], steps)["value"]
    vals = tf_cast_values(vals, tfdt, npdt)
    wts = tf_cast_values(
        [rng.uniform(0.5, 2.0, size=weight_shape) for _ in range(steps + 1)], tfdt, npdt
    )
    c = weight_assign(decay, npdt)
    g = tf.Graph()
    with g.as_default():
        v_ph = tf.compat.v1.placeholder(tfdt, shape=value_shape, name="value")
        w_ph = tf.compat.v1.placeholder(tfdt, shape=weight_shape, name="weight")
        op = moving_averages.weighted_moving_average(v_ph, decay, w_ph)
        out = {
            "value_shape": list(value_shape),
            "weight_shape": list(weight_shape),
            "values": [],
            "weights": [],
            "average": [],
        }
        num, den = np.zeros(value_shape, npdt), np.zeros(weight_shape, npdt)
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for t in range(1, steps + 1):
                avg = sess.run(op, feed_dict={v_ph: vals[t], w_ph: wts[t]})
                assert avg.dtype == npdt and avg.shape == value_shape
                num, d1, p1 = step(num, vals[t] * wts[t], c)
                den, d2, p2 = step(den, wts[t], c)
                check.equal(f"{name} t={t}", avg, num / den, npdt)
                check.normal(f"{name} t={t}", npdt, d1, p1, d2, p2, num, den, avg)
                out["values"].append(to_hex(vals[t], npdt))
                out["weights"].append(to_hex(wts[t], npdt))
                out["average"].append(to_hex(avg, npdt))
    return {"name": name, "dtype": dname, "decay": decay, **out}


# --------------------------------------------------------------------------- names


def restore_names():
    g = tf.Graph()
    with g.as_default():

        def var(name, trainable=True):
            return tf.compat.v1.get_variable(
                name, initializer=tf.ones(2), trainable=trainable, use_resource=True
            )

        w, b, frozen, c = var("w"), var("b"), var("frozen", trainable=False), var("c")
        tf.compat.v1.train.get_or_create_global_step()
        ema = tf.compat.v1.train.ExponentialMovingAverage(0.99)
        ema.apply([w, b, frozen])

        def names(mapping):
            return {k: v.op.name for k, v in sorted(mapping.items())}

        return {
            "averaged": ["w", "b", "frozen"],
            "trainable": ["w", "b", "c"],
            "variables": ["w", "b", "frozen", "c", "global_step"],
            "average_name": {v.op.name: ema.average_name(v) for v in (w, b, frozen, c)},
            "variables_to_restore": names(ema.variables_to_restore()),
            "subset": ["w"],
            "variables_to_restore_subset": names(ema.variables_to_restore([w])),
        }


def main():
    tf.config.optimizer.set_jit(False)
    tf.config.set_visible_devices([], "GPU")
    if sys.byteorder != "little":
        raise SystemExit("run this on a little-endian machine")
    check = Check()
    extend = []
    for dname in EXTEND_DTYPES:
        extend.append(extend_variable("extend", dname, 0.9, 4, 8, check))
        for second in ("new", "all"):
            extend.append(
                extend_zero_debias(
                    f"extend_zero_debias_apply_{second}", dname, 0.9, 4, 8, second, check
                )
            )
    assign = []
    for dname in ASSIGN_DTYPES:
        assign.append(assign_eager("assign_python", dname, "python", ASSIGN_DECAYS, check))
        if dname in ("float32", "float64"):
            assign.append(assign_eager("assign_float64", dname, "float64", ASSIGN_DECAYS, check))
        # bfloat16(1 - 0.001) == 1: TF's bias factor would be 0 at 0.999.
        decay = 0.99 if dname == "bfloat16" else 0.999
        assign.append(assign_zero_debias("assign_zero_debias", dname, decay, 8, check))
    weighted_cases = []
    for dname in WEIGHTED_DTYPES:
        weighted_cases.append(weighted("weighted_scalar", dname, 0.9, (), 8, check))
        weighted_cases.append(weighted("weighted_same_shape", dname, 0.99, (4,), 8, check))
    doc = {
        "tensorflow_version": tf.__version__,
        "generator": "tests/tf_reference/generate_extra.py",
        "numpy_version": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "extend": extend,
        "assign": assign,
        "weighted": weighted_cases,
        "restore_names": restore_names(),
    }
    for problem in check.problems:
        print("PROBLEM", problem)
    if check.problems:
        raise SystemExit(f"{len(check.problems)} problems: fixture not written")
    path = os.path.join(HERE, "extra_ops.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"TensorFlow {tf.__version__}: wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
