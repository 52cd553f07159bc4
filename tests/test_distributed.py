"""Multi-process training on the CPU, end to end, in real processes: `torchrun --nproc_per_node 2 vidkit train`
(gloo) trains each rank on its half of the data, its gathered validation metrics equal a single-process evaluation of
the checkpoint it saved, only rank 0 writes, and a run killed after its first epoch resumes — here as a two-node
launch (`--nnodes 2 --node_rank ... --master_addr ... --master_port ...`) — to exactly the weights of the
uninterrupted run. Two processes started by hand with only Slurm's variables (what `srun` sets) or only Open MPI's
(what `mpirun` sets), and none of torchrun's, form one gloo group and train too: `srun vidkit train` and
`mpirun python train.py`."""
import csv, json, os, random, signal, socket, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TORCHRUN, VIDKIT = str(BIN / 'torchrun'), str(BIN / 'vidkit')
EPOCHS = 2
# 9 classes x 3 videos: 18 training clips (9 per rank, 3 batches of 3) and 9 validation clips, which do not divide
# by 2: the distributed loader pads them to 10 (5 per rank), and the metrics must not count the padding
TRAIN = ['train', '--arch', 'tsn_r18', '--layout', 'synth', '--frames', 4, '--size', 32, '--bs', 3, '--workers', 0,
         '--epochs', EPOCHS, '--lr', 3e-3]


TORCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'NODE_RANK')
LAUNCHER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'MV2_', 'MPI_LOCAL')   # a launch these tests may themselves run in


def _env():
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(data, work, *extra, launch=('--nproc_per_node', 2), port=None):
    "The `torchrun ... vidkit train` command line (a static rendezvous on a free local port)."
    port = port or _free_port()
    return [TORCHRUN, *map(str, launch), '--master_addr', '127.0.0.1', '--master_port', str(port), VIDKIT,
            *map(str, TRAIN), '--data', str(data), '--work-dir', str(work), *map(str, extra)]


def _run(cmd, timeout=240):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _files(work: Path):
    return sorted(str(p.relative_to(work)) for p in work.rglob('*') if p.is_file())


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from vidkit.synth import make_synthetic_dataset, SYNTH_CLASSES
    root = tmp_path_factory.mktemp('ddp') / 'data'
    make_synthetic_dataset(root, n_per_class=3, size=(40, 48), num_frames=(10, 12), seed=0, classes=SYNTH_CLASSES[:9])
    return root


@pytest.fixture(scope='module')
def run_a(synth, tmp_path_factory):
    "An uninterrupted 2-epoch run on 2 CPU processes."
    work = tmp_path_factory.mktemp('a')
    r = _run(_torchrun(synth, work))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return work, r


def test_two_ranks_each_train_on_half_the_data(run_a):
    work, r = run_a
    m = json.loads((work / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['total_batch_size'] == 6 and m['distributed']['backend'] == 'gloo'
    ranks = m['distributed']['ranks']
    assert [x['rank'] for x in ranks] == [0, 1] and ranks[0]['pid'] != ranks[1]['pid']
    # each rank: 9 of the 18 training clips per epoch (the counts are of the last fit: EPOCHS epochs)
    assert [x['train_items'] for x in ranks] == [9 * EPOCHS] * 2
    assert [x['valid_items'] for x in ranks] == [5 * EPOCHS] * 2           # 9 validation clips padded to 2 x 5
    assert 'training on 2 processes (gloo, cpu)' in r.stdout
    assert r.stdout.count('wrote ') == 1                                   # only rank 0 reports (and writes)


def test_only_rank0_writes_one_set_of_files(run_a):
    work, _ = run_a
    assert _files(work) == ['config.yaml', 'history.csv', 'metrics.json', 'models/best.pth', 'models/last.pth']   # no temp files
    rows = list(csv.reader((work / 'history.csv').read_text().splitlines()))
    assert rows[0][0] == 'epoch' and [row[0] for row in rows[1:]] == [str(e) for e in range(EPOCHS)]
    assert torch.load(work / 'models' / 'last.pth', weights_only=True)['epoch'] == EPOCHS


def test_gathered_metrics_equal_a_single_process_evaluation(run_a, synth):
    "The validation loss and accuracy of the 2-process run are those of the saved model on the 9 clips, in one process."
    from vidkit.cli import build_parser
    from vidkit.cli_train import make_dls, _sampler_for
    from vidkit.learner import video_learner
    from vidkit.checkpoint import load_checkpoint
    torch.set_num_threads(1)
    work, _ = run_a
    m = json.loads((work / 'metrics.json').read_text())['metrics']
    args = build_parser().parse_args([str(a) for a in TRAIN] + ['--data', str(synth)])
    dls = make_dls(args, sampler=_sampler_for(args.arch, args.frames))       # the same deterministic validation pipeline
    assert len(dls.valid_ds) == 9
    learn = video_learner(dls, args.arch)
    learn.model.load_state_dict(load_checkpoint(work / 'models' / 'last.pth')['model'])
    with learn.no_bar():
        valid_loss, acc, top5 = learn.validate()
        _, _, losses = learn.get_preds(with_loss=True)
    assert abs(m['accuracy'] - float(acc)) < 1e-6 and abs(m['top5_accuracy'] - float(top5)) < 1e-6, (m, acc, top5)
    assert abs(m['valid_loss'] - float(valid_loss)) < 1e-5, (m['valid_loss'], valid_loss)
    # the test can tell: counting the padded clip (the first one, twice) would give another loss
    padded = float(torch.cat([losses, losses[:1]]).mean())
    assert abs(padded - float(valid_loss)) > 1e-4 and abs(float(losses.mean()) - float(valid_loss)) < 1e-5


EVAL_VIEWS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from vidkit.distributed import setup_distributed, end_distributed
    from vidkit.inference import load_recognizer
    from vidkit.data import VideoDataLoaders
    from vidkit.learner import video_learner
    from vidkit.views import evaluate_views
    info = setup_distributed(cpu=True)
    ckpt, data, out = map(Path, sys.argv[1:4])
    rec = load_recognizer(ckpt, device='cpu')
    cfg = rec.data_cfg
    dls = VideoDataLoaders.from_synthetic(data, size=cfg.size, short_side=cfg.short_side, bs=3, num_workers=0,
                                          sampler=cfg.build_sampler().with_test_mode(False))
    res = evaluate_views(video_learner(dls, rec.model), dls.valid_ds.records, num_clips=2, num_crops=3, out=out/'views.npz')
    (out/f'rank{info.rank}.json').write_text(json.dumps(dict(metrics=res.metrics, scores=res.scores.tolist(),
                                                              targets=res.targets.tolist(), paths=res.paths, world=info.world_size)))
    end_distributed(0)
""")

def test_multi_view_testing_on_two_ranks_equals_one_process(run_a, synth, tmp_path):
    "evaluate_views under torchrun: each rank scores half the videos; every rank gets the single-process result, rank 0 writes it."
    import numpy as np
    ckpt = run_a[0] / 'models' / 'last.pth'
    script = tmp_path / 'eval_views.py'
    script.write_text(EVAL_VIEWS)
    one, two = tmp_path / 'one', tmp_path / 'two'
    one.mkdir(); two.mkdir()
    r = _run([sys.executable, str(script), str(ckpt), str(synth), str(one)])
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run([TORCHRUN, '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
              str(script), str(ckpt), str(synth), str(two)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b0, b1 = (json.loads(p.read_text()) for p in (one / 'rank0.json', two / 'rank0.json', two / 'rank1.json'))
    assert a['world'] == 1 and b0['world'] == b1['world'] == 2
    assert b0 == b1                                                     # the same gathered result on both ranks
    assert len(a['paths']) == 9 and b0['paths'] == a['paths'] and b0['targets'] == a['targets']   # 9 videos, in order, none twice
    assert torch.allclose(torch.tensor(b0['scores']), torch.tensor(a['scores']), atol=1e-5)
    assert b0['metrics'] == a['metrics']
    assert sorted(p.name for p in two.iterdir()) == ['rank0.json', 'rank1.json', 'views.npz']     # one result file
    with np.load(one / 'views.npz') as z1, np.load(two / 'views.npz') as z2:
        assert np.allclose(z1['scores'], z2['scores'], atol=1e-5) and list(z1['paths']) == list(z2['paths'])


def test_killed_run_resumes_on_two_nodes_to_the_same_weights(run_a, synth, tmp_path):
    work_a, _ = run_a
    work = tmp_path / 'b'
    # 1. the same run, killed (SIGKILL to both ranks and torchrun) as soon as the first epoch's checkpoint exists
    import psutil
    p = subprocess.Popen(_torchrun(synth, work), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last, t0 = work / 'models' / 'last.pth', time.time()
    while not last.exists() and p.poll() is None and time.time() - t0 < 200: time.sleep(0.02)
    procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]   # torchrun puts ranks in their own sessions
    for q in procs:
        try: q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    _, err = p.communicate(timeout=60)
    psutil.wait_procs(procs, timeout=30)
    assert last.exists(), err[-4000:]
    assert torch.load(last, weights_only=True)['epoch'] == 1, 'the run finished its second epoch before it was killed'
    assert not [f for f in _files(work) if f.endswith('.tmp')]
    # 2. `--resume`, launched as two nodes of one process each (as on two machines, here both on localhost)
    port = _fixed_free_port()           # two torchrun agents: the second connects before the first listens
    nodes = [subprocess.Popen(_torchrun(synth, work, '--resume', port=port,
                                        launch=('--nnodes', 2, '--node_rank', i, '--nproc_per_node', 1)),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [n.communicate(timeout=240) for n in nodes]
    for n, (out, err) in zip(nodes, outs): assert n.returncode == 0, out[-2000:] + err[-4000:]
    assert 'resuming after epoch 1' in outs[0][0]
    m = json.loads((work / 'metrics.json').read_text())
    assert [(x['rank'], x['node_rank'], x['local_rank']) for x in m['distributed']['ranks']] == [(0, 0, 0), (1, 1, 0)]
    # 3. the weights and the per-epoch validation results are those of the uninterrupted run
    a = torch.load(work_a / 'models' / 'last.pth', weights_only=True)
    b = torch.load(work / 'models' / 'last.pth', weights_only=True)
    assert b['epoch'] == EPOCHS
    diff = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    ha, hb = (list(csv.reader((w / 'history.csv').read_text().splitlines())) for w in (work_a, work))
    assert [row[0] for row in hb[1:]] == [str(e) for e in range(EPOCHS)]
    assert [row[2:-1] for row in hb[1:]] == [row[2:-1] for row in ha[1:]]     # valid_loss and metrics per epoch


# --- Slurm and MPI: the ranks come from the cluster's launcher, not torchrun ---

def _slurm_job_with_free_port():
    "A made-up SLURM_JOB_ID whose derived MASTER_PORT is free here (all tasks derive the same port from it)."
    from vidkit.launchers import slurm_master_port
    for _ in range(200):
        job = random.randrange(10**6, 10**7)
        try:
            with socket.socket() as s: s.bind(('', slurm_master_port(job, 0)))
            return str(job)
        except OSError: continue
    raise RuntimeError('no free port')


def _slurm_vars(rank, n=2, nodelist='localhost', job=None):
    "What `srun --ntasks n` sets for task `rank` on one node (a step: SLURM_STEP_ID), and no MASTER_ADDR / MASTER_PORT."
    return dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(n), SLURM_LOCALID=str(rank), SLURM_NODELIST=nodelist,
                SLURM_JOB_ID=job or _slurm_job_with_free_port(), SLURM_STEP_ID='0')


def _fixed_free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), for processes that race to one rendezvous: a client that
    retries connecting to a local ephemeral-range port before the server listens can, rarely, connect to itself."""
    for _ in range(200):
        port = random.randrange(15000, 31000)
        try:
            with socket.socket() as s: s.bind(('', port))
            return port
        except OSError: continue
    raise RuntimeError('no free port')


def _mpi_vars(rank, n=2):
    "What `mpirun -np n` (Open MPI) sets on one machine: no MASTER_ADDR (all ranks are local: vidkit uses localhost)."
    return dict(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE=str(n), OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                OMPI_COMM_WORLD_LOCAL_SIZE=str(n))


def _launch_by_hand(cmd, per_rank, logs: Path, timeout=240):
    "Start `cmd` once per rank with that rank's launcher variables (and none of torchrun's); wait for all; their outputs."
    logs.mkdir(parents=True, exist_ok=True)
    files = [(open(logs / f'{r}.out', 'w+'), open(logs / f'{r}.err', 'w+')) for r in range(len(per_rank))]  # no pipe to fill
    env = {**_env(), 'PYTHONFAULTHANDLER': '1', 'PYTHONUNBUFFERED': '1'}
    procs = [subprocess.Popen(cmd, env={**env, **v}, stdout=o, stderr=e, text=True) for v, (o, e) in zip(per_rank, files)]
    t0, outs = time.time(), []
    try:
        for p in procs: p.wait(timeout=max(1, timeout - (time.time() - t0)))
    finally:
        for p in procs:         # still running (a hang): SIGABRT makes faulthandler write where it waits, then kill
            if p.poll() is None: p.send_signal(signal.SIGABRT)
        for p in procs:
            try: p.wait(timeout=10)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
        for o, e in files:
            o.seek(0); e.seek(0)
            outs.append((o.read(), e.read())); o.close(); e.close()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n" + out[-2000:] + err[-4000:]
    return outs


def test_srun_vidkit_train(synth, tmp_path):
    "`srun --ntasks 2 vidkit train`: two tasks with only Slurm's variables form one gloo group and each trains on its half."
    work, job = tmp_path / 'slurm', _slurm_job_with_free_port()
    cmd = [VIDKIT, *map(str, TRAIN), '--epochs', '1', '--data', str(synth), '--work-dir', str(work)]
    outs = _launch_by_hand(cmd, [_slurm_vars(r, job=job) for r in (0, 1)], tmp_path / 'logs')
    m = json.loads((work / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['distributed']['backend'] == 'gloo'
    ranks = m['distributed']['ranks']
    assert [(x['rank'], x['local_rank'], x['node_rank']) for x in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert ranks[0]['pid'] != ranks[1]['pid']
    assert [x['train_items'] for x in ranks] == [9, 9] and [x['valid_items'] for x in ranks] == [5, 5]
    assert 'training on 2 processes (gloo, cpu)' in outs[0][0] and outs[1][0].count('wrote ') == 0
    assert _files(work) == ['config.yaml', 'history.csv', 'metrics.json', 'models/best.pth', 'models/last.pth']


SCRIPT = """
import json, os, sys
from pathlib import Path
import torch, torch.nn as nn
torch.set_num_threads(1)
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import rank_distrib, num_distrib
from vidkit.core import set_seed
from vidkit.launchers import detect_launcher
from vidkit.distributed import distrib_info, gather_object, end_distributed

out, launcher = Path(sys.argv[1]), detect_launcher()             # before setup_distributed sets torch's variables
set_seed(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(25, 8, generator=g)
items = [(x[i], (x[i, 0] > 0).long()) for i in range(len(x))]
# num_workers=0: fastai's TfmdDL forks min(16, cpus) workers by default, and a process forked from one that runs gloo's
# threads can hang on a lock it inherited held
dls = DataLoaders(TfmdDL(items[:16], bs=4, shuffle=True, num_workers=0), TfmdDL(items[16:], bs=4, num_workers=0), device='cpu')
learn = Learner(dls, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), loss_func=CrossEntropyLossFlat(),
                metrics=[accuracy], path=out)
with learn.distrib_ctx_auto(), learn.no_bar(): learn.fit(2, 1e-2)
info = distrib_info()
ranks = gather_object(dict(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, backend=info.backend,
                           pid=info.pid, launcher=launcher, fastai=[rank_distrib(), num_distrib()],
                           env={k: os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')},
                           weights=torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist(),
                           **learn.distrib_stats))
if info.is_main: (out / 'ranks.json').write_text(json.dumps(ranks))
end_distributed()
"""


@pytest.mark.parametrize('launcher', ['slurm', 'mpi'])
def test_srun_and_mpirun_python_script(launcher, tmp_path):
    "`srun python train.py` / `mpirun -np 2 python train.py`: a fastai script with `distrib_ctx_auto` trains on 2 processes."
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent(SCRIPT))
    if launcher == 'slurm':       # a compressed node list: rank 0 runs on its first host
        job = _slurm_job_with_free_port()
        per_rank = [_slurm_vars(r, nodelist='localhost,gpu[02-03]', job=job) for r in (0, 1)]
    else:
        port = str(_fixed_free_port())
        per_rank = [{**_mpi_vars(r), 'MASTER_PORT': port} for r in (0, 1)]
    _launch_by_hand([sys.executable, str(script), str(tmp_path)], per_rank, tmp_path / 'logs', timeout=180)
    ranks = json.loads((tmp_path / 'ranks.json').read_text())
    assert [(x['rank'], x['local_rank'], x['world_size'], x['backend'], x['launcher']) for x in ranks] == \
           [(0, 0, 2, 'gloo', launcher), (1, 1, 2, 'gloo', launcher)]
    assert ranks[0]['pid'] != ranks[1]['pid']
    assert [x['fastai'] for x in ranks] == [[0, 2], [1, 2]]          # what fastai reads: RANK, WORLD_SIZE
    assert [x['env'] for x in ranks] == [dict(RANK=str(r), WORLD_SIZE='2', LOCAL_RANK=str(r), MASTER_ADDR=
                                              'localhost' if launcher == 'slurm' else '127.0.0.1') for r in (0, 1)]
    assert [x['train_items'] for x in ranks] == [16, 16] and [x['valid_items'] for x in ranks] == [10, 10]   # 2 epochs
    assert ranks[0]['weights'] == ranks[1]['weights']                # one model: the gradients were averaged
