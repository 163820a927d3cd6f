"""Running one model over several processes or machines: tensor-parallel workers and data-parallel replicas."""
