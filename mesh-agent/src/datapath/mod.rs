//! The kernel side as user space drives it: the programs found, loaded and attached
//! (`loader`, `features`, `tcnl`), what lives on bpffs (`pins`), writing and reading
//! the maps (`maps`, `stats`), the datapath log's switch and reader (`log`), the raw
//! `bpf(2)` calls aya lacks (`sys`), and the library's API over all of it (`mesh`).

pub mod conntrack;
pub mod features;
pub mod loader;
pub mod log;
pub mod maps;
pub mod mesh;
pub mod pins;
pub mod stats;
pub mod sys;
pub mod tcnl;
