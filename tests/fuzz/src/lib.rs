//! What the fuzz targets share: a model carried through the agent's whole pipeline on
//! the host (admission and encoding, the planner, every planned write applied to the
//! in-memory maps with their consistency checked after each one), so that a target
//! fails on a panic anywhere in it and on any write that leaves a packet a dangling or
//! half-written service.

use mesh_agent::{
    datapath::maps::MemMaps,
    model::{desired_with, Claims, Model, Reserved},
    plan::Reconciler,
};

/// A small Maglev table: the planner's full-table path is reached by small inputs.
pub const SLOTS: u32 = 1 << 14;

/// Interfaces resolve to an index and MAC made from the name (no kernel here).
fn resolve(name: &str) -> Result<(u32, [u8; 6]), mesh_agent::MeshError> {
    Ok((name.len() as u32 + 10, [2, 0, 0, 0, 0, 1]))
}

/// Applies `models` one after the other as the agent would, checking the maps after
/// every write; after the last, planning it again must write nothing.
pub fn through_the_planner(models: &[Model]) {
    let mut r = Reconciler::new(SLOTS);
    let mut maps = MemMaps::new(SLOTS);
    let mut claims = Claims::new();
    let reserved = Reserved::new(4789, 9478);
    let mut last = None;
    for m in models {
        let Ok(d) = desired_with(m, resolve, &claims, &reserved) else {
            continue;
        };
        // A plan that fails (ids run out) records and writes nothing; a Maglev array
        // without room is a shortfall, not a failure.
        let Ok(ops) = r.plan(&d) else { continue };
        for (i, op) in ops.iter().enumerate() {
            maps.apply(op);
            if let Err(e) = maps.check_consistent() {
                panic!("after write {i} of {} ({op:?}): {e}", ops.len());
            }
        }
        claims = d.claims.clone();
        last = Some(d);
    }
    if let Some(d) = last {
        let again = r.plan(&d).expect("the applied state plans again");
        assert!(
            again.is_empty(),
            "a second plan of the same model writes {again:?}"
        );
    }
}
