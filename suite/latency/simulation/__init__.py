"""Simulated latency: every strategy at any N on named hardware, without a device.

The strategy's own ``run_layers`` runs on the heaviest rank's shard built without weights (meta
tensors); a dispatch mode prices every op with a device profile (``suite.latency.device``), a
simulated communicator prices every collective with the interconnect profile's ``Profile.seconds`` (the
cost model projections use too), and both advance a virtual clock with a host, a compute stream, a side
stream and one link (``clock``). Rows say ``provenance: simulated`` and name both profiles.
"""

from suite.latency.simulation.cells import Simulator, check_cells, simulate_cells
from suite.latency.simulation.clock import Timeline
from suite.latency.simulation.communicator import SimulatedCommunicator
from suite.latency.simulation.costing import CostMode

__all__ = ["CostMode", "SimulatedCommunicator", "Simulator", "Timeline", "check_cells", "simulate_cells"]
