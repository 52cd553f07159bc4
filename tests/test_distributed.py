"""Multi-process training on the CPU, end to end, in real processes: `torchrun --nproc_per_node 2 vidkit train`
(gloo) trains each rank on its half of the data, its gathered validation metrics equal a single-process evaluation of
the checkpoint it saved, only rank 0 writes, and a run killed after its first epoch resumes — here as a two-node
launch (`--nnodes 2 --node_rank ... --master_addr ... --master_port ...`) — to exactly the weights of the
uninterrupted run."""
import csv, json, os, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest
import torch

BIN = Path(sys.executable).parent
TORCHRUN, VIDKIT = str(BIN / 'torchrun'), str(BIN / 'vidkit')
EPOCHS = 2
# 9 classes x 3 videos: 18 training clips (9 per rank, 3 batches of 3) and 9 validation clips, which do not divide
# by 2: the distributed loader pads them to 10 (5 per rank), and the metrics must not count the padding
TRAIN = ['train', '--arch', 'tsn_r18', '--layout', 'synth', '--frames', 4, '--size', 32, '--bs', 3, '--workers', 0,
         '--epochs', EPOCHS, '--lr', 3e-3]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE', 'GROUP_RANK')}
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
    assert _files(work) == ['history.csv', 'metrics.json', 'models/best.pth', 'models/last.pth']   # no temp files
    rows = list(csv.reader((work / 'history.csv').read_text().splitlines()))
    assert rows[0][0] == 'epoch' and [row[0] for row in rows[1:]] == [str(e) for e in range(EPOCHS)]
    assert torch.load(work / 'models' / 'last.pth', weights_only=True)['epoch'] == EPOCHS


def test_gathered_metrics_equal_a_single_process_evaluation(run_a, synth):
    "The validation loss and accuracy of the 2-process run are those of the saved model on the 9 clips, in one process."
    from vidkit.cli import build_parser, make_dls, _sampler_for
    from vidkit.learner import video_learner, load_checkpoint
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
    port = _free_port()
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
