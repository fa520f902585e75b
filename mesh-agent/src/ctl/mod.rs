//! What `meshctl` shows and does, computed from the pinned maps and the agent's state
//! files (so it works while the agent is down): the views (`inspect`) and `trace`.

pub mod doctor;
pub mod inspect;
pub mod trace;
