"""Recipe study on Fashion-MNIST: supervised and self-training recipes for the
product's network, searched outside the product's training loop.

A harness for trying recipes quickly (label smoothing, pad-and-crop, random
erasing, soft pseudo-labels, repeated labeled images) with the product's data
split (`load_splits("fashion_mnist", labeled_per_class=500, val_per_class=100)`)
and network (`build_model`, widths 32,64,128,128,128); docs/semi-supervised.md
reports what it measured. Choose by validation; pass `--test 1` only for the
final recipes.

Usage (the rows of docs/semi-supervised.md#fashion-mnist-the-recipe-study):
  python benchmarks/recipe_study.py sup --seed S --tag base --lr 0.01 --mom 0.5 \
      --bs 32 --epochs 50 --aug none --test 1
  python benchmarks/recipe_study.py sup --seed S --tag supB --lr 0.05 --mom 0.9 \
      --bs 64 --epochs 60 --aug flipcrop --pad 2 --ls 0.1 --test 1
  python benchmarks/recipe_study.py st --seed S --tag st2 \
      --teacher OUT/weights/supB_sup_sS.weights.h5 --tta 1 --select all --soft 1 \
      --lab_rep 2 --s_init teacher --s_lr 0.02 --s_aug flipcroperase --s_pad 2 \
      --s_epochs 5 --test 1
Every finished stage appends one JSON line to OUT/results.jsonl (OUT: the
RECIPE_STUDY_DIR environment variable, default runs/recipe_study).
"""
import argparse, json, os, sys, time
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.environ.get("RECIPE_STUDY_DIR", os.path.join("runs", "recipe_study"))
os.makedirs(HERE, exist_ok=True)
import tensorflow as tf
import keras
from stl10_keras import config as cfg
from stl10_keras.data import load_splits
from stl10_keras.model import build_model

NC = 10


def log(rec):
    rec["time"] = time.strftime("%H:%M:%S")
    with open(os.path.join(HERE, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("RESULT", json.dumps(rec), flush=True)


def make_model(seed):
    keras.utils.set_random_seed(seed)
    c = cfg.preset("default", "fashion_mnist", "baseline")
    c.model.widths = (32, 64, 128, 128, 128)
    c.model.convs_per_stage = (1,) * 5
    return build_model(c, (28, 28, 1))


def augment_batch(x, aug, pad):
    """x: uint8 [B,28,28,1] -> float32 augmented."""
    x = tf.cast(x, tf.float32)
    if aug == "none":
        return x
    b = tf.shape(x)[0]
    if "flip" in aug:
        m = tf.random.uniform([b, 1, 1, 1]) < 0.5
        x = tf.where(m, tf.reverse(x, axis=[2]), x)
    if "crop" in aug:
        xp = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        oy = tf.random.uniform([b], 0, 2 * pad + 1, dtype=tf.int32)
        ox = tf.random.uniform([b], 0, 2 * pad + 1, dtype=tf.int32)
        r = oy[:, None] + tf.range(28)[None, :]
        c = ox[:, None] + tf.range(28)[None, :]
        x = tf.gather(xp, r, axis=1, batch_dims=1)
        x = tf.gather(x, c, axis=2, batch_dims=1)
    if "erase" in aug:  # random erasing (cutout) 1 square of side 8..12 px, p=0.5
        s = tf.random.uniform([b], 8, 13, dtype=tf.int32)
        cy = tf.random.uniform([b], 0, 28, dtype=tf.int32)
        cx = tf.random.uniform([b], 0, 28, dtype=tf.int32)
        on = tf.random.uniform([b]) < 0.5
        ii = tf.range(28)[None, :]
        my = tf.abs(ii - cy[:, None]) * 2 < s[:, None]
        mx = tf.abs(ii - cx[:, None]) * 2 < s[:, None]
        mask = tf.logical_and(my[:, :, None], mx[:, None, :])
        mask = tf.logical_and(mask, on[:, None, None])[..., None]
        x = tf.where(mask, 0.0, x)
    return x


def fit(model, x, y, a, val=None, init_lr=None):
    """Train `model` on uint8 x, float targets y [N,10]. Returns stats."""
    n = len(x)
    steps_per_epoch = n // a.bs
    total = int(a.epochs * steps_per_epoch)
    warm = int(a.warmup * steps_per_epoch)
    lr = a.lr
    if warm > 0:
        sched = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total - warm, alpha=0.0, warmup_target=lr, warmup_steps=warm)
    else:
        sched = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total, alpha=0.0)
    opt = keras.optimizers.SGD(sched, momentum=a.mom, nesterov=a.nesterov,
                               weight_decay=a.wd)
    model.compile(optimizer=opt,
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                            label_smoothing=a.ls),
                  metrics=["accuracy"], jit_compile=False)
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.float32)))
    ds = ds.shuffle(n, seed=a.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(a.bs, drop_remainder=True)
    aug, pad = a.aug, a.pad
    ds = ds.map(lambda xb, yb: (augment_batch(xb, aug, pad), yb),
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(4)
    ep_chunk = max(1, int(round(a.epochs / 5)))  # report val 5 times
    t0 = time.time()
    hist = []
    done = 0
    while done < total:
        s = min(total - done, ep_chunk * steps_per_epoch)
        h = model.fit(ds, steps_per_epoch=s, epochs=1, verbose=0)
        done += s
        va = accuracy(model, *val) if val is not None else None
        hist.append((done, round(float(h.history["accuracy"][-1]), 4), va))
        print(f"  step {done}/{total} train_acc {h.history['accuracy'][-1]:.4f} "
              f"val {va} {time.time()-t0:.0f}s", flush=True)
    wall = time.time() - t0
    imgs = total * a.bs
    return dict(images=imgs, wall_s=round(wall, 1), img_per_s=round(imgs / wall, 1),
                curve=hist)


def predict_probs(model, x, tta=False, bs=1000):
    p = tf.nn.softmax(model.predict(x.astype(np.float32), batch_size=bs, verbose=0)).numpy()
    if tta:
        xf = x[:, :, ::-1, :]
        p2 = tf.nn.softmax(model.predict(xf.astype(np.float32), batch_size=bs, verbose=0)).numpy()
        p = (p + p2) / 2
    return p


def accuracy(model, x, y, tta=False):
    return round(100.0 * float((predict_probs(model, x, tta).argmax(1) == y).mean()), 2)


def onehot(y):
    return np.eye(NC, dtype=np.float32)[y]


def select(p, a, y_true):
    """Pick pseudo-labels. Returns idx, targets, stats."""
    conf = p.max(1)
    pred = p.argmax(1)
    n = len(p)
    if a.select == "all":
        idx = np.arange(n)
    elif a.select == "thresh":
        idx = np.nonzero(conf >= a.tau)[0]
    elif a.select == "topk":  # class-balanced: per predicted class keep the k most confident
        k = int(a.keep * n / NC)
        idx = []
        for c in range(NC):
            ic = np.nonzero(pred == c)[0]
            ic = ic[np.argsort(-conf[ic])][:k]
            idx.append(ic)
        idx = np.sort(np.concatenate(idx))
    else:
        raise ValueError(a.select)
    if a.soft:
        q = p[idx] ** (1.0 / a.temp)
        tgt = q / q.sum(1, keepdims=True)
    else:
        tgt = onehot(pred[idx])
    st = dict(kept=int(len(idx)), kept_share=round(len(idx) / n, 4),
              pl_acc_kept=round(100 * float((pred[idx] == y_true[idx]).mean()), 2),
              pl_acc_all=round(100 * float((pred == y_true).mean()), 2),
              per_class_kept=[int((pred[idx] == c).sum()) for c in range(NC)])
    return idx, tgt, st


def load(seed):
    s = load_splits("fashion_mnist", labeled_per_class=500, val_per_class=100, seed=seed)
    xu = np.concatenate(list(s.unlabeled_batches(5000)))
    yu = np.asarray(s.unlabeled_labels)
    assert len(xu) == len(yu) == 55000, (len(xu), len(yu))
    return s, xu, yu


def sub_args(a, prefix):
    """Namespace view of args with a prefix (e.g. 's_' for student)."""
    d = {k[len(prefix):]: v for k, v in vars(a).items() if k.startswith(prefix)}
    b = argparse.Namespace(**vars(a))
    for k, v in d.items():
        setattr(b, k, v)
    return b


def add_train_args(p, prefix="", **dflt):
    g = dict(lr=0.05, mom=0.9, wd=5e-4, bs=64, epochs=60, aug="flipcrop", pad=2,
             ls=0.0, warmup=0.0, nesterov=False)
    g.update(dflt)
    for k, v in g.items():
        if isinstance(v, bool):
            p.add_argument(f"--{prefix}{k}", type=int, default=int(v))
        else:
            p.add_argument(f"--{prefix}{k}", type=type(v), default=v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sup", "st"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--test", type=int, default=0)
    ap.add_argument("--tta", type=int, default=0, help="flip TTA for pseudo-labels")
    ap.add_argument("--teacher", default="", help="weights file of a trained teacher")
    ap.add_argument("--save", default="")
    add_train_args(ap)
    # self-training
    add_train_args(ap, "s_", epochs=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--select", default="topk")
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--soft", type=int, default=0)
    ap.add_argument("--temp", type=float, default=1.0)
    ap.add_argument("--lab_rep", type=int, default=1, help="repeat labeled set r times")
    ap.add_argument("--s_init", default="scratch", choices=["scratch", "teacher"])
    ap.add_argument("--ft_epochs", type=float, default=0, help="fine-tune on labeled after")
    ap.add_argument("--ft_lr", type=float, default=0.005)
    a = ap.parse_args()
    t_all = time.time()
    s, xu, yu = load(a.seed)
    val = (s.x_val, s.y_val)
    base = dict(tag=a.tag, seed=a.seed, mode=a.mode)
    total_imgs = 0

    def finish(model, stage, st, extra=None):
        rec = dict(base, stage=stage, val=accuracy(model, *val),
                   val_tta=accuracy(model, *val, tta=True), **st)
        if a.test:
            rec["test"] = accuracy(model, s.x_test, s.y_test)
            rec["test_tta"] = accuracy(model, s.x_test, s.y_test, tta=True)
        if extra:
            rec.update(extra)
        log(rec)
        os.makedirs(os.path.join(HERE, "weights"), exist_ok=True)
        model.save_weights(os.path.join(HERE, "weights", f"{a.tag}_{stage}_s{a.seed}.weights.h5"))
        return rec

    tcfg = {k: getattr(a, k) for k in ["lr", "mom", "wd", "bs", "epochs", "aug", "pad", "ls", "warmup", "nesterov"]}
    model = make_model(a.seed)
    if a.teacher:
        model.load_weights(a.teacher)
        rec = finish(model, "teacher_loaded", dict(images=0, wall_s=0, img_per_s=0), dict(cfg=tcfg))
    else:
        st = fit(model, s.x_train, onehot(s.y_train), a, val)
        total_imgs += st["images"]
        finish(model, "sup" if a.mode == "sup" else "teacher", st, dict(cfg=tcfg))
        if a.save:
            model.save_weights(os.path.join(HERE, a.save + f"_s{a.seed}.weights.h5"))
    if a.mode == "sup":
        return
    sa = sub_args(a, "s_")
    scfg = {k: getattr(sa, k) for k in tcfg} | dict(select=a.select, keep=a.keep, tau=a.tau,
            soft=a.soft, temp=a.temp, lab_rep=a.lab_rep, s_init=a.s_init, tta=a.tta,
            ft_epochs=a.ft_epochs, ft_lr=a.ft_lr)
    teacher = model
    for r in range(1, a.rounds + 1):
        t0 = time.time()
        p = predict_probs(teacher, xu, tta=bool(a.tta))
        idx, tgt, plst = select(p, a, yu)
        pred_s = time.time() - t0
        xs = np.concatenate([s.x_train] * a.lab_rep + [xu[idx]])
        ys = np.concatenate([onehot(s.y_train)] * a.lab_rep + [tgt])
        student = make_model(a.seed * 100 + r)
        if a.s_init == "teacher":
            student.set_weights(teacher.get_weights())
        st = fit(student, xs, ys, sa, val)
        inf_imgs = len(xu) * (2 if a.tta else 1)
        total_imgs += st["images"]
        extra = dict(cfg=scfg, round=r, predict_s=round(pred_s, 1), infer_images=inf_imgs,
                     cum_train_images=total_imgs, cum_wall_s=round(time.time() - t_all, 1), **plst)
        finish(student, f"student_r{r}", st, extra)
        if a.ft_epochs > 0:
            fa = argparse.Namespace(**vars(a))
            fa.epochs, fa.lr = a.ft_epochs, a.ft_lr
            st2 = fit(student, s.x_train, onehot(s.y_train), fa, val)
            total_imgs += st2["images"]
            finish(student, f"student_r{r}_ft", st2, dict(cum_train_images=total_imgs))
        teacher = student
        if a.save:
            student.save_weights(os.path.join(HERE, a.save + f"_r{r}_s{a.seed}.weights.h5"))


if __name__ == "__main__":
    main()
