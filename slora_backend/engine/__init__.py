"""Engine core: scheduler, unified page pool, adapter residency, model runner."""
