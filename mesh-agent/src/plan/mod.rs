//! From the desired state to map writes: the reconciler (`reconcile`: the minimal,
//! ordered, make-before-break plan against its own record of what it applied), the
//! plan's unit (`ops`), the Maglev array's regions (`regions`), a restarted agent's
//! adoption of what the maps hold (`adopt`), and the Maglev tables (`maglev`).

mod adopt;
pub mod maglev;
mod ops;
mod reconcile;
mod regions;

pub use adopt::*;
pub use ops::*;
pub use reconcile::*;
use regions::Regions;
