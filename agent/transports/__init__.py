"""Links between the hub and its boards, all behind one interface (base.Transport)."""
