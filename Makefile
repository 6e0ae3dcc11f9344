# Shortcuts; each target is one documented command (see README.md).
.PHONY: install test gradcheck smoke plots bench

install:
	pip install -e '.[test]'

test:
	python -m pytest -q

gradcheck:
	python -m tinynorm gradcheck

smoke:
	python experiments/fig2_cifar10_nv.py --preset smoke

plots:
	python -m plots

bench:
	python experiments/bench_ops.py
	python experiments/bench_bn.py --keep-freed-memory
	python experiments/bench_vs_torch.py
	python experiments/bench_conv_vs_torch.py --torch-channels-last
