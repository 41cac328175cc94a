"""The building blocks every family shares: gates, the unified attention and MLP, the super block, the plain
layers a subnet is built from, and slimmable layers."""
