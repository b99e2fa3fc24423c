"""Flow control: requests wait inside epp while the pool is saturated, by priority band, fair across flows.

llm-d-router's flow control (the `flowControl` feature gate and config section; off by default):
`config` reads the section, `queue` holds the waiting requests, `controller` decides when each
one goes and how the others end (429, 503, with upstream's reason header).
"""

from epp.flowcontrol.config import (
    POLICY_TYPES,
    BandConfig,
    FlowControlConfig,
    PolicyPlugin,
    UsageLimitPolicy,
    parse_flow_control,
    parse_quantity,
    policy_plugin,
)
from epp.flowcontrol.controller import (
    DROPPED_REASON_HEADER,
    FlowControlError,
    FlowController,
    Outcome,
    outcome_error,
)

__all__ = ["DROPPED_REASON_HEADER", "POLICY_TYPES", "BandConfig", "FlowControlConfig", "FlowControlError",
           "FlowController", "Outcome", "PolicyPlugin", "UsageLimitPolicy", "outcome_error", "parse_flow_control",
           "parse_quantity", "policy_plugin"]
