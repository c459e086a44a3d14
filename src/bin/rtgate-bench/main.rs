//! rtgate-bench: the load tool (being written).
fn main() {}
