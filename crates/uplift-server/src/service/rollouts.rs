//! Rollouts: starting one (the rollout stored with its members pending,
//! its first offers told to the live view and the sessions, then its
//! members written) or previewing it (the same plan, nothing
//! done), and where each one stands, derived from the devices it targeted.

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::rollout::engine::{Command, PauseReason, RolloutState};
use crate::rollout::window::Window;
use crate::rollout::{phases, scheduler};
use crate::state::AppState;
use crate::store::{
    DeviceFilter, DeviceRecord, DeviceStanding, MemberPage, NewPlan, ReleaseRecord, RolloutChange,
    RolloutPlan, RolloutRecord, RolloutTally, Timestamp,
};
use std::collections::{HashMap, HashSet};
use time::OffsetDateTime;
use uplift_proto::api::{
    PhaseTally, RolloutCommandName, RolloutCreate, RolloutMember, RolloutMemberPage,
    RolloutMemberQuery, RolloutPreview, RolloutProgress, RolloutShare, RolloutStatus, RolloutView,
};
use uplift_proto::auth::AuditAction;
use uplift_proto::channel::AgentState;
use uplift_proto::events::{EventAbout, RolloutEvent};
use uplift_proto::{DeviceId, DeviceType, Tag, Version};

/// Starts a rollout of `request.release` to the listed devices, or to the
/// devices of the release's type (all, or those with the tags), only those
/// running one of `from_versions` if given, and pushes the new target to
/// those online; recorded in the audit log as `actor`'s.
pub async fn start(
    state: &AppState,
    actor: &Principal,
    request: RolloutCreate,
) -> ServiceResult<RolloutView> {
    let asked = format!("release {}", request.release);
    let result = launch(state, request, &actor.name).await;
    let target = match &result {
        Ok(view) => format!("rollout {}", view.id),
        Err(_) => asked,
    };
    audit::record(state, actor, AuditAction::RolloutStart, &target, &result).await;
    result
}

/// What starting `request` would do now, without doing it: the refusals a
/// start would give, the devices it would target and its phase sizes, and
/// warnings. Nothing is stored, offered, published or audited (a preview
/// changes nothing). Which devices fall in which phase depends on the
/// moment a rollout starts (its seed), so only the sizes are the start's.
pub async fn preview(state: &AppState, request: RolloutCreate) -> ServiceResult<RolloutPreview> {
    let plan = plan(state, &request).await?;
    let phase_sizes = phases::sizes(&plan.members, request.policy.phases.len());
    let warnings = warnings(state, &request, &plan.members, &phase_sizes);
    Ok(RolloutPreview {
        devices_total: plan.members.len() as u64,
        release: plan.release.version,
        device_type: plan.release.device_type,
        phase_sizes,
        warnings,
    })
}

/// What an operator may want to know before starting a rollout that
/// would put `members` in phases of `phase_sizes`: each check is cheap
/// (in memory), as a preview is asked for interactively.
fn warnings(
    state: &AppState,
    request: &RolloutCreate,
    members: &[(DeviceId, u32)],
    phase_sizes: &[u64],
) -> Vec<String> {
    let mut warnings = Vec::new();
    let online: HashSet<DeviceId> = state.hub.online_ids().into_iter().collect();
    let offline = members.iter().filter(|(d, _)| !online.contains(d)).count();
    if offline > 0 {
        warnings.push(format!(
            "{offline} of the {} devices are offline now; each is offered the release when it \
             next connects",
            members.len()
        ));
    }
    // The final phase takes the rest and may well be empty; a listed phase
    // that gets nobody is passed at once, which the operator may not expect.
    let phases = phase_sizes.len();
    for (phase, _) in phase_sizes[..phases - 1]
        .iter()
        .enumerate()
        .filter(|(_, &n)| n == 0)
    {
        warnings.push(format!(
            "phase {} of {phases} gets no devices (its reach adds none to the phases before it); \
             it is passed at once",
            phase + 1
        ));
    }
    if request.policy.dynamic {
        warnings.push(
            "a dynamic rollout also takes in devices that enroll (or come to have its tags) while \
             it runs; these are the devices it starts with"
                .to_owned(),
        );
    }
    warnings
}

/// A rollout as a start now would make it: its release, and its devices
/// each in its phase, as of `now` (`created_at`, which seeds the phases).
#[derive(Debug)]
struct Plan {
    release: ReleaseRecord,
    members: Vec<(DeviceId, u32)>,
    now: OffsetDateTime,
    created_at: Timestamp,
}

/// Checks `request` and plans the rollout it asks for, or says why not:
/// the one path of [`start`] (and a retry) and [`preview`], so a preview
/// refuses what a start would and counts phases as a start would.
async fn plan(state: &AppState, request: &RolloutCreate) -> ServiceResult<Plan> {
    let release =
        state
            .store
            .release(&request.release)
            .await?
            .ok_or(ServiceError::ReleaseNotFound {
                version: request.release.clone(),
            })?;
    if request.allow_downgrade {
        check_downgrade_signed(&release)?;
    }
    request.policy.check()?;
    if request.policy.dynamic && request.devices.is_some() {
        return Err(ServiceError::DynamicList);
    }
    if request.policy.dynamic && !request.from_versions.is_empty() {
        return Err(ServiceError::DynamicVersions);
    }
    let devices = targets(state, &release, request).await?;
    if let Some(window) = &request.policy.window {
        Window::parse(window)?;
    }
    let created_at = Timestamp::now();
    let now = created_at.instant();
    // Phases are decided here, once, and a start stores them with the
    // devices; the seed is the creation time as views show it, so anyone
    // can recompute them.
    let seed = phases::seed(&release.version, &created_at.to_string());
    let members = phases::assign(&devices, &request.policy.phases, &seed);
    Ok(Plan {
        release,
        members,
        now,
        created_at,
    })
}

/// How long a start waits for its first offers to be sent before it
/// writes the members anyway (a device that does not read holds back its
/// session's frame).
const OFFERS_BEFORE_MEMBERS: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the rollout `request` asks for, as `by`.
async fn launch(state: &AppState, request: RolloutCreate, by: &str) -> ServiceResult<RolloutView> {
    let Plan {
        release,
        members,
        now,
        created_at,
    } = plan(state, &request).await?;
    // The first step is decided before the rollout is stored, and stored
    // with it: its first offers go out after one short transaction (the
    // rollout, its members as one pending list), and the members are
    // written as rows after (3 s at 90 000 devices on PostgreSQL).
    let first = RolloutState::start(now);
    let step = scheduler::first_step(&request.policy, &first, &members, now);
    let rollout = state
        .store
        .create_rollout(
            &release,
            &members,
            request.allow_downgrade,
            request.limits,
            &NewPlan {
                policy: &request.policy,
                state: step.state.as_ref().unwrap_or(&first),
                tags: request.tags.as_ref(),
                from_versions: &request.from_versions,
                offer: &step.offer,
            },
            created_at,
        )
        .await?;
    tracing::info!(rollout = rollout.id, release = %rollout.release, devices = members.len(), phases = request.policy.phases.len() + 1, "rollout started");
    // Said before the first phase starts, so the stream reads in order.
    state.events.publish(
        EventAbout::Rollout {
            rollout_id: rollout.id,
            event: RolloutEvent::Started {
                release: rollout.release.clone(),
                devices: members.len() as u64,
                by: by.to_owned(),
            },
        },
        created_at,
    );
    scheduler::announce_first(state, &rollout, &request.policy, &step, now).await;
    write_members_once_offered(state, rollout.id);
    let plan = RolloutPlan {
        policy: request.policy,
        state: step.state.unwrap_or(first),
        revision: 0,
        members_pending: true,
    };
    Ok(planned_view(state, rollout, &members, &step.offer, plan))
}

/// A rollout as just started, from what the start decided rather than
/// from the database (at 100 000 devices, counting them there took
/// seconds beside the offers): every member pending, as the store counts
/// a rollout whose members are not written yet.
fn planned_view(
    state: &AppState,
    rollout: RolloutRecord,
    members: &[(DeviceId, u32)],
    offered: &[DeviceId],
    plan: RolloutPlan,
) -> RolloutView {
    let offered: HashSet<&DeviceId> = offered.iter().collect();
    let mut phases = vec![PhaseTally::default(); plan.policy.phases.len() + 1];
    for (device, phase) in members {
        let tally = &mut phases[*phase as usize];
        tally.devices += 1;
        tally.offered += u64::from(offered.contains(device));
    }
    let total = members.len() as u64;
    let tally = Tally {
        counts: uplift_proto::api::RolloutCounts {
            pending: total,
            ..Default::default()
        },
        superseded: 0,
        total,
    };
    view_of(state, rollout, tally, Some(progress_of(plan, phases)))
}

/// Writes rollout `id`'s members as rows once this replica's sessions
/// have sent their offers, in a task of its own: at 100 000 devices the
/// write is seconds of the database's work, which held up the offers when
/// it ran beside them, and the start's answer waited 9 s for it (20 s in
/// all). The other replicas push their offers meanwhile, from the
/// notification. Until the rows are there, the rollout is counted from
/// its pending list, and a request that needs the rows waits for them
/// ([`members_written`]).
fn write_members_once_offered(state: &AppState, id: i64) {
    let (owed, store) = (state.hub.offers_owed(), state.store.clone());
    tokio::spawn(async move {
        let told = std::time::Instant::now();
        if !owed.sent(OFFERS_BEFORE_MEMBERS).await {
            tracing::info!(
                rollout = id,
                "some sessions here had not sent their offers {} s after they were told \
                 (devices not reading their channel); writing the members now",
                OFFERS_BEFORE_MEMBERS.as_secs()
            );
        }
        match store.store_rollout_members(id).await {
            Ok(Some(_)) => tracing::info!(
                rollout = id,
                "rollout's members written, {:.1} s after its offers were told",
                told.elapsed().as_secs_f64()
            ),
            // Written already: a request that could not wait any longer,
            // or another replica's scheduler, wrote them.
            Ok(None) => {}
            // The start stands (its offers are out): the driving replica
            // writes them once they are PENDING_GRACE old.
            Err(e) => tracing::warn!(
                rollout = id,
                "rollout started, but writing its members failed: {e}; the replica driving \
                 rollouts writes them within {} s of its start",
                scheduler::PENDING_GRACE.as_secs()
            ),
        }
    });
}

/// How often a request that needs a rollout's member rows looks whether
/// they are written.
const MEMBERS_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Returns once `rollout`'s members are rows, for a request that decides
/// on them or lists them. Its starter writes them once its offers are sent
/// (seconds at 100 000 devices); this waits for that rather than writing
/// them beside it (which would push the first offers a second time), and
/// writes them itself once they are [`scheduler::PENDING_GRACE`] old (the
/// start was cut short), as the driving replica would.
pub(crate) async fn members_written(
    state: &AppState,
    rollout: &RolloutRecord,
) -> ServiceResult<()> {
    let grace_ends = rollout.created_at.instant() + scheduler::PENDING_GRACE;
    while state
        .store
        .rollout_plan(rollout.id)
        .await?
        .is_some_and(|plan| plan.members_pending)
    {
        let now = OffsetDateTime::now_utc();
        if now >= grace_ends {
            scheduler::store_pending_members(state, rollout, now).await?;
            break;
        }
        tokio::time::sleep(MEMBERS_POLL).await;
    }
    Ok(())
}

/// Refuses a downgrade rollout to a release its key did not sign as allowed
/// to replace newer versions. The server reads the manifest without
/// checking signatures (it holds no trust of its own): the devices check
/// them, and this check only spares the operator a rollout every device
/// refuses.
fn check_downgrade_signed(release: &ReleaseRecord) -> ServiceResult<()> {
    let manifest = uplift_release::SignedManifest::from_json(&release.manifest_json)
        .and_then(|signed| signed.parse_unverified())
        .map_err(|source| {
            ServiceError::Manifest(crate::chunks::LoadError::Manifest {
                version: release.version.to_string(),
                source,
            })
        })?;
    if manifest.allows_downgrades() {
        return Ok(());
    }
    Err(ServiceError::DowngradeNotSigned {
        version: release.version.clone(),
        may_replace_up_to: manifest.may_replace_up_to,
    })
}

/// The devices a new rollout is for, or why there are none.
async fn targets(
    state: &AppState,
    release: &ReleaseRecord,
    request: &RolloutCreate,
) -> ServiceResult<Vec<DeviceId>> {
    if request.tags.as_ref().is_some_and(|t| t.tags().is_empty()) {
        return Err(ServiceError::NoTagsGiven);
    }
    let versions = &request.from_versions;
    // Versions are checked against the live view, not in the database
    // query: a device that has just said what it runs counts at once.
    let runs_one = |d: &DeviceRecord| {
        d.running_version
            .as_ref()
            .is_some_and(|v| versions.contains(v))
    };
    let devices = match (&request.devices, &request.tags) {
        (Some(_), Some(_)) => return Err(ServiceError::ListAndTags),
        (Some(list), None) if versions.is_empty() => {
            // Each listed device must exist (one query for the list), here
            // and not only when the rollout is stored: a preview refuses it too.
            if let Some(id) = state.store.unknown_devices(list).await?.into_iter().next() {
                return Err(ServiceError::DeviceNotFound { id });
            }
            list.clone()
        }
        (Some(list), None) => {
            // Each listed device must exist; those on another version are left out.
            let mut kept = Vec::new();
            for id in list {
                if runs_one(&super::devices::record(state, id).await?) {
                    kept.push(id.clone());
                }
            }
            kept
        }
        // The whole type, as before tags: ids only, nothing to check.
        (None, None) if versions.is_empty() => {
            state.store.devices_of_type(&release.device_type).await?
        }
        (None, tags) => {
            let filter = DeviceFilter {
                device_type: Some(release.device_type.clone()),
                tags: tags.clone(),
                ..DeviceFilter::default()
            };
            super::devices::select(state, filter)
                .await?
                .into_iter()
                .filter(|d| versions.is_empty() || runs_one(d))
                .map(|d| d.id)
                .collect()
        }
    };
    if !devices.is_empty() {
        return Ok(devices);
    }
    let runs = || {
        let names: Vec<&str> = versions.iter().map(Version::as_str).collect();
        format!("runs {}", names.join(" or "))
    };
    let target = match (&request.devices, &request.tags) {
        (Some(list), _) if !versions.is_empty() => {
            format!("of the {} listed {}", list.len(), runs())
        }
        (_, Some(tags)) if versions.is_empty() => {
            format!("of type {} has {tags}", release.device_type)
        }
        (_, Some(tags)) => format!("of type {} has {tags} and {}", release.device_type, runs()),
        (None, None) if !versions.is_empty() => {
            format!("of type {} {}", release.device_type, runs())
        }
        _ => {
            return Err(ServiceError::NoDevices {
                device_type: release.device_type.clone(),
            })
        }
    };
    Err(ServiceError::NoMatch { target })
}

/// Rollout `id`'s record, or why not.
async fn stored(state: &AppState, id: i64) -> ServiceResult<RolloutRecord> {
    state
        .store
        .rollout(id)
        .await?
        .ok_or(ServiceError::RolloutNotFound { id })
}

/// One rollout as it stands now.
pub async fn get(state: &AppState, id: i64) -> ServiceResult<RolloutView> {
    let rollout = stored(state, id).await?;
    view(state, rollout).await
}

/// One page of rollout `id`'s devices with their phase and how far each
/// got, by phase then device, as `query` filters them.
pub async fn members(
    state: &AppState,
    id: i64,
    query: RolloutMemberQuery,
) -> ServiceResult<RolloutMemberPage> {
    let limit = super::devices::page_limit(query.limit)?;
    let after = query
        .after
        .as_deref()
        .map(parse_member_cursor)
        .transpose()?;
    let rollout = stored(state, id).await?;
    members_written(state, &rollout).await?;
    let page = MemberPage {
        phase: query.phase,
        outcome: query.outcome,
        after,
        limit,
    };
    let (records, mut devices): (Vec<_>, Vec<DeviceRecord>) = state
        .store
        .rollout_members_page(id, &page)
        .await?
        .into_iter()
        .unzip();
    state.live.overlay(&mut devices);
    let members: Vec<RolloutMember> = records
        .into_iter()
        .zip(devices)
        .map(|(m, d)| RolloutMember {
            device_id: d.id,
            hardware_id: d.hardware_id,
            phase: m.phase,
            offered_at: m.offered_at.map(|t| t.to_string()),
            outcome: m
                .outcome
                .and_then(|o| serde_json::to_value(o).ok())
                .and_then(|v| v.as_str().map(str::to_owned)),
            error: m.error,
            running_version: d.running_version,
            state: d.state,
        })
        .collect();
    let next = (members.len() == limit as usize)
        .then(|| {
            members
                .last()
                .map(|m| format!("{}:{}", m.phase, m.device_id))
        })
        .flatten();
    Ok(RolloutMemberPage {
        devices: members,
        next,
    })
}

/// `after` of a rollout's device page: `<phase>:<device id>`, as `next`
/// gave it.
fn parse_member_cursor(cursor: &str) -> ServiceResult<(u32, DeviceId)> {
    cursor
        .split_once(':')
        .and_then(|(phase, device)| Some((phase.parse().ok()?, device.parse().ok()?)))
        .ok_or_else(|| ServiceError::BadQuery {
            field: "after",
            why: format!(
                "{:?} is not a cursor this server gave out; pass the `next` of the previous page",
                cursor.chars().take(80).collect::<String>()
            ),
        })
}

/// How long a rollout view waits for the writer to store what devices
/// reported before the request, so that its counts agree with the device
/// views (two write intervals; a database that cannot keep up gets counted
/// as it is).
const READ_YOUR_WRITES: std::time::Duration = std::time::Duration::from_millis(500);

/// Every rollout as it stands now, oldest first. Their devices are counted
/// in the database, all rollouts in one query: nothing per device is
/// loaded, whatever the size of the fleet.
pub async fn list(state: &AppState) -> ServiceResult<Vec<RolloutView>> {
    state.live.stored_now(READ_YOUR_WRITES).await;
    let rollouts = state.store.list_rollouts().await?;
    let mut counted: HashMap<i64, RolloutTally> = state
        .store
        .rollout_tallies(None)
        .await?
        .into_iter()
        .collect();
    let mut plans: HashMap<i64, RolloutPlan> =
        state.store.rollout_plans().await?.into_iter().collect();
    let mut sizes = tallies_by_rollout(state.store.phase_tallies(None).await?);
    let moves = state.store.supersessions(None).await?;
    Ok(rollouts
        .into_iter()
        .map(|rollout| {
            let tally = counted.remove(&rollout.id).unwrap_or_default();
            let progress = plans
                .remove(&rollout.id)
                .map(|plan| progress_of(plan, sizes.remove(&rollout.id).unwrap_or_default()));
            let mut view = view_of(state, rollout, tally, progress);
            add_supersessions(&mut view, &moves);
            view
        })
        .collect())
}

fn tallies_by_rollout(rows: Vec<(i64, u32, PhaseTally)>) -> HashMap<i64, Vec<PhaseTally>> {
    let mut tallies: HashMap<i64, Vec<PhaseTally>> = HashMap::new();
    for (id, phase, tally) in rows {
        let phases = tallies.entry(id).or_default();
        phases.resize(phases.len().max(phase as usize + 1), PhaseTally::default());
        phases[phase as usize] = tally;
    }
    tallies
}

/// Says in `view` which rollouts took devices from it and which it took
/// devices from, out of (older, newer, devices) moves.
fn add_supersessions(view: &mut RolloutView, moves: &[(i64, i64, u64)]) {
    for &(older, newer, devices) in moves {
        if older == view.id {
            view.superseded_by.push(RolloutShare {
                rollout_id: newer,
                devices,
            });
        }
        if newer == view.id {
            view.supersedes.push(RolloutShare {
                rollout_id: older,
                devices,
            });
        }
    }
}

async fn view(state: &AppState, rollout: RolloutRecord) -> ServiceResult<RolloutView> {
    let id = rollout.id;
    state.live.stored_now(READ_YOUR_WRITES).await;
    let tally = state
        .store
        .rollout_tallies(Some(id))
        .await?
        .pop()
        .map(|(_, tally)| tally)
        .unwrap_or_default();
    let progress = match state.store.rollout_plan(id).await? {
        Some(plan) => {
            let mut sizes = tallies_by_rollout(state.store.phase_tallies(Some(id)).await?);
            Some(progress_of(plan, sizes.remove(&id).unwrap_or_default()))
        }
        None => None,
    };
    let mut view = view_of(state, rollout, tally, progress);
    add_supersessions(&mut view, &state.store.supersessions(Some(id)).await?);
    Ok(view)
}

/// The engine's state in the operator's terms.
fn progress_of(plan: RolloutPlan, mut phase_tallies: Vec<PhaseTally>) -> RolloutProgress {
    let phases = plan.policy.phases.len() as u32 + 1;
    phase_tallies.resize(phases as usize, PhaseTally::default());
    let phase_sizes = phase_tallies.iter().map(|t| t.devices).collect();
    let (phase, paused_because) = match &plan.state {
        RolloutState::Running { phase, .. } | RolloutState::AwaitingApproval { phase } => {
            (Some(*phase), None)
        }
        RolloutState::Paused { phase, reason } => (Some(*phase), Some(pause_sentence(reason))),
        RolloutState::Aborted { .. } | RolloutState::Finished { .. } => (None, None),
    };
    RolloutProgress {
        state: plan.state.name().to_owned(),
        phase,
        phases,
        phase_sizes,
        phase_tallies,
        paused_because,
        detail: serde_json::to_value(&plan.state).unwrap_or_default(),
        policy: plan.policy,
    }
}

/// Why a rollout paused, for the operator. Phases are counted from 1 here,
/// as `uplift rollout status` counts them ("in phase 2 of 4"); the stored
/// state and `progress.phase` count from 0.
pub(crate) fn pause_sentence(reason: &PauseReason) -> String {
    match reason {
        PauseReason::Operator {
            by,
            awaiting_approval: false,
        } => format!("paused by {by}; `uplift rollout resume` continues it"),
        PauseReason::Operator {
            by,
            awaiting_approval: true,
        } => format!(
            "paused by {by} while the next phase awaited approval; `uplift rollout resume` goes back to waiting for it"
        ),
        PauseReason::ErrorThreshold {
            phase,
            failed,
            finished,
            devices,
        } => {
            let named: Vec<String> = devices
                .iter()
                .take(10)
                .map(|d| match &d.error {
                    Some(error) => format!("{} ({error})", d.device),
                    None => format!("{} ({:?})", d.device, d.outcome),
                })
                .collect();
            format!(
                "{failed} of {finished} finished devices of phase {} failed, over the error threshold: {}; \
                 fix the cause and `uplift rollout resume` (these failures are then accepted), or `uplift rollout abort`",
                phase + 1,
                named.join(", ")
            )
        }
        PauseReason::BelowSuccessLevel {
            phase,
            succeeded,
            needed,
        } => format!(
            "phase {} finished with {succeeded} devices on the release, {needed} needed; \
             `uplift rollout resume` accepts it and starts the next phase",
            phase + 1
        ),
    }
}

/// A device that just enrolled, or whose tags changed to `tags`, joins
/// every running dynamic rollout of its type whose tags it has (a rollout
/// without tags takes any), in that rollout's current phase, and is offered
/// what the phase allows at once. Failures are logged: neither enrollment
/// nor a tag change fails for them.
pub async fn join_dynamic(
    state: &AppState,
    device: &DeviceId,
    device_type: &DeviceType,
    tags: &[Tag],
) {
    let joined = async {
        for (id, plan) in state.store.rollout_plans().await? {
            let phase = match &plan.state {
                RolloutState::Running { phase, .. }
                | RolloutState::AwaitingApproval { phase }
                | RolloutState::Paused { phase, .. } => *phase,
                RolloutState::Aborted { .. } | RolloutState::Finished { .. } => continue,
            };
            if !plan.policy.dynamic {
                continue;
            }
            let Some(rollout) = state.store.rollout(id).await? else {
                continue;
            };
            if rollout.device_type != *device_type
                || rollout.tags.as_ref().is_some_and(|t| !t.matches(tags))
            {
                continue;
            }
            if state.store.add_rollout_member(id, device, phase).await? {
                tracing::info!(rollout = id, device = %device, phase, "device joined a dynamic rollout");
                scheduler::advance(state, id, OffsetDateTime::now_utc()).await?;
            }
        }
        Ok::<(), crate::store::StoreError>(())
    };
    if let Err(e) = joined.await {
        tracing::warn!(device = %device, "joining dynamic rollouts: {e}");
    }
}

/// A new rollout of rollout `id`'s release, with its policy and limits, to
/// the devices that failed or timed out in it.
async fn retry(state: &AppState, id: i64, by: &str) -> ServiceResult<RolloutView> {
    let rollout = stored(state, id).await?;
    let plan = state
        .store
        .rollout_plan(id)
        .await?
        .ok_or(ServiceError::NotPhased { id })?;
    members_written(state, &rollout).await?;
    let failed: Vec<_> = state
        .store
        .rollout_members(id)
        .await?
        .into_iter()
        .filter(|(m, _)| {
            matches!(
                m.outcome,
                Some(
                    crate::rollout::engine::Outcome::Failed
                        | crate::rollout::engine::Outcome::TimedOut
                )
            )
        })
        .map(|(_, d)| d.id)
        .collect();
    if failed.is_empty() {
        return Err(ServiceError::NothingToRetry { id });
    }
    launch(
        state,
        RolloutCreate {
            release: rollout.release,
            devices: Some(failed),
            tags: None,
            from_versions: Vec::new(),
            allow_downgrade: rollout.allow_downgrade,
            limits: rollout.limits,
            policy: plan.policy,
        },
        by,
    )
    .await
}

/// Applies an operator's command to rollout `id`, as `actor`, and records
/// it in the audit log.
pub async fn command(
    state: &AppState,
    id: i64,
    name: RolloutCommandName,
    actor: &Principal,
) -> ServiceResult<RolloutView> {
    let (command, action) = match name {
        RolloutCommandName::Pause => (Command::Pause, AuditAction::RolloutPause),
        RolloutCommandName::Resume => (Command::Resume, AuditAction::RolloutResume),
        RolloutCommandName::Approve => (Command::Approve, AuditAction::RolloutApprove),
        RolloutCommandName::Abort => (Command::Abort, AuditAction::RolloutAbort),
        RolloutCommandName::Retry => {
            let result = retry(state, id, &actor.name).await;
            let target = match &result {
                Ok(new) => format!("rollout {id} (retried as rollout {})", new.id),
                Err(_) => format!("rollout {id}"),
            };
            audit::record(state, actor, AuditAction::RolloutRetry, &target, &result).await;
            return result;
        }
    };
    let result = steer(state, id, command, &actor.name).await;
    audit::record(state, actor, action, &format!("rollout {id}"), &result).await;
    result
}

/// Applies an engine command to rollout `id`, as `by`.
async fn steer(
    state: &AppState,
    id: i64,
    command: Command,
    by: &str,
) -> ServiceResult<RolloutView> {
    let rollout = stored(state, id).await?;
    // A command decides on the members: written first if still pending.
    members_written(state, &rollout).await?;
    // Outcomes reported since the last tick count before the command: an
    // abort must not withdraw a device that has just finished.
    scheduler::advance(state, id, OffsetDateTime::now_utc()).await?;
    for _ in 0..4 {
        let plan = state
            .store
            .rollout_plan(id)
            .await?
            .ok_or(ServiceError::NotPhased { id })?;
        // What each device reports counts: a pause takes back only the
        // offers of devices not at work on the release.
        let members = scheduler::members(state, id, &rollout.release).await?;
        let now = OffsetDateTime::now_utc();
        let transition = crate::rollout::engine::command(&plan.state, &members, &command, by, now)
            .map_err(|source| ServiceError::Refused { id, source })?;
        let change = RolloutChange {
            state: Some(&transition.state),
            offer: &[],
            settle: &[],
            accept_failures: &transition.accept_failures,
            withdraw: &transition.withdraw,
            hold: &transition.hold,
            now: Timestamp::from(now),
        };
        if state
            .store
            .apply_rollout_change(id, plan.revision, &change)
            .await?
        {
            tracing::info!(
                rollout = id,
                command = command.name(),
                by,
                state = transition.state.name(),
                withdrawn = transition.withdraw.len(),
                held = transition.hold.len(),
                "rollout command"
            );
            scheduler::take_back(state, &transition.withdraw, id, Timestamp::from(now)).await;
            scheduler::take_back(state, &transition.hold, id, Timestamp::from(now)).await;
            let by = by.to_owned();
            let event = match &command {
                Command::Pause => RolloutEvent::Paused {
                    reason: match &transition.state {
                        RolloutState::Paused { reason, .. } => pause_sentence(reason),
                        _ => pause_sentence(&PauseReason::Operator {
                            by: by.clone(),
                            awaiting_approval: false,
                        }),
                    },
                },
                Command::Resume => RolloutEvent::Resumed { by },
                Command::Approve => RolloutEvent::Approved { by },
                Command::Abort => RolloutEvent::Aborted { by },
            };
            state.events.publish(
                EventAbout::Rollout {
                    rollout_id: id,
                    event,
                },
                Timestamp::from(now),
            );
            // What the new state allows (the next phase's offers) goes out now.
            scheduler::advance(state, id, now).await?;
            return view(state, rollout).await;
        }
    }
    Err(ServiceError::Store(crate::store::StoreError::Conflict(
        format!("rollout {id} kept changing while the command was applied; try again"),
    )))
}

/// `tally` counts the devices the rollout was started on, as stored (the
/// writer stores a state change within [`crate::writer::FLUSH_EVERY`]).
fn view_of(
    state: &AppState,
    rollout: RolloutRecord,
    tally: Tally,
    progress: Option<RolloutProgress>,
) -> RolloutView {
    RolloutView {
        id: rollout.id,
        release: rollout.release,
        device_type: rollout.device_type,
        allow_downgrade: rollout.allow_downgrade,
        created_at: rollout.created_at.to_string(),
        devices_total: tally.total,
        counts: tally.counts,
        status: tally.status(),
        superseded: tally.superseded,
        limits: rollout.limits,
        waiting_for_turn: state.turns.counts(rollout.id).1 as u64,
        progress,
        superseded_by: Vec::new(),
        supersedes: Vec::new(),
        tags: rollout.tags,
        from_versions: rollout.from_versions,
    }
}

/// Where one targeted device stands in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    InProgress,
    Succeeded,
    Failed,
}

/// Where `d` stands in rollout `rollout_id` of `release`; `None` if a newer
/// rollout took it over.
pub fn classify(release: &Version, rollout_id: i64, d: &DeviceStanding) -> Option<Outcome> {
    if d.target_rollout != Some(rollout_id) {
        return None;
    }
    // A failure or a download is this rollout's only if the device says it
    // is about this release; otherwise it is left from an earlier one.
    let working_on_it = d.reported_target.as_ref() == Some(release);
    Some(match d.state {
        Some(AgentState::Idle) if d.running_version.as_ref() == Some(release) => Outcome::Succeeded,
        Some(AgentState::Failed | AgentState::RolledBack) if working_on_it => Outcome::Failed,
        Some(
            AgentState::Downloading
            | AgentState::Verifying
            | AgentState::AwaitingReboot
            | AgentState::RebootPending
            | AgentState::Testing,
        ) if working_on_it => Outcome::InProgress,
        _ => Outcome::Pending,
    })
}

/// A rollout's devices counted by where they stand.
pub use crate::store::RolloutTally as Tally;

impl Tally {
    pub fn of(release: &Version, rollout_id: i64, devices: &[DeviceRecord]) -> Self {
        let mut tally = Tally {
            total: devices.len() as u64,
            ..Tally::default()
        };
        for d in devices {
            match classify(release, rollout_id, &d.standing()) {
                None => tally.superseded += 1,
                Some(Outcome::Pending) => tally.counts.pending += 1,
                Some(Outcome::InProgress) => {
                    tally.counts.in_progress += 1;
                    if d.state == Some(AgentState::AwaitingReboot) {
                        tally.counts.awaiting_reboot += 1;
                    }
                }
                Some(Outcome::Succeeded) => tally.counts.succeeded += 1,
                Some(Outcome::Failed) => tally.counts.failed += 1,
            }
        }
        tally
    }

    pub fn status(&self) -> RolloutStatus {
        if self.counts.pending + self.counts.in_progress > 0 {
            RolloutStatus::Running
        } else if self.superseded == self.total {
            RolloutStatus::Superseded
        } else {
            RolloutStatus::Finished
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::service::testing;
    use crate::store::stamp::ts;
    use crate::store::MemberRecord;
    use uplift_proto::channel::Report;
    use uplift_proto::{DeviceId, ErrorKind};

    /// Device `dev-1`'s record, as stored.
    pub(crate) fn device(
        target_rollout: Option<i64>,
        state: Option<AgentState>,
        running: &str,
        reported_target: Option<&str>,
    ) -> DeviceRecord {
        DeviceRecord {
            id: "dev-1".parse().unwrap(),
            device_type: "gw".parse().unwrap(),
            hardware_id: "hw-1".parse().unwrap(),
            public_key: "key".into(),
            enrolled_at: Timestamp::now(),
            last_seen: None,
            running_version: Some(running.parse().unwrap()),
            state,
            booted_slot: None,
            reported_target: reported_target.map(|v| v.parse().unwrap()),
            progress: None,
            last_error: None,
            target_rollout,
            address: None,
            removed_at: None,
            private_addresses: Vec::new(),
        }
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn a_pause_names_its_phase_as_the_operator_counts_phases_from_one() {
        use crate::rollout::engine::{FailedDevice, Outcome as Ended};
        // The second phase: stored as 1, shown by `uplift rollout status`
        // as "phase 2 of N".
        let over = PauseReason::ErrorThreshold {
            phase: 1,
            failed: 2,
            finished: 2,
            devices: vec![FailedDevice {
                device: "dev-9".parse().unwrap(),
                outcome: Ended::Failed,
                error: Some("health check failed".into()),
            }],
        };
        let why = pause_sentence(&over);
        assert!(
            why.starts_with("2 of 2 finished devices of phase 2 failed")
                && why.contains("dev-9 (health check failed)"),
            "{why}"
        );
        let short = PauseReason::BelowSuccessLevel {
            phase: 0,
            succeeded: 1,
            needed: 2,
        };
        assert!(
            pause_sentence(&short).starts_with("phase 1 finished with 1 devices"),
            "{}",
            pause_sentence(&short)
        );
    }

    #[test]
    fn a_device_moved_to_a_newer_rollout_is_superseded_whatever_it_reports() {
        let d = device(Some(8), Some(AgentState::Idle), "2.0", None);
        assert_eq!(classify(&v("2.0"), 7, &d.standing()), None);
        let never_targeted = device(None, None, "1.0", None);
        assert_eq!(classify(&v("2.0"), 7, &never_targeted.standing()), None);
    }

    #[test]
    fn devices_are_classified_by_state_and_by_what_they_say_they_work_on() {
        let release = v("2.0");
        let at = |state, running, target| {
            classify(
                &release,
                7,
                &device(Some(7), state, running, target).standing(),
            )
        };
        assert_eq!(
            at(Some(AgentState::Idle), "2.0", None),
            Some(Outcome::Succeeded)
        );
        assert_eq!(
            at(Some(AgentState::Idle), "1.0", None),
            Some(Outcome::Pending)
        );
        assert_eq!(at(None, "1.0", None), Some(Outcome::Pending));
        for working in [
            AgentState::Downloading,
            AgentState::Verifying,
            AgentState::AwaitingReboot,
            AgentState::RebootPending,
            AgentState::Testing,
        ] {
            assert_eq!(
                at(Some(working), "1.0", Some("2.0")),
                Some(Outcome::InProgress)
            );
            // Still busy with an older rollout's release: not this one's progress.
            assert_eq!(
                at(Some(working), "1.0", Some("1.5")),
                Some(Outcome::Pending)
            );
        }
        for failed in [AgentState::Failed, AgentState::RolledBack] {
            assert_eq!(at(Some(failed), "1.0", Some("2.0")), Some(Outcome::Failed));
            // A failure left from an earlier release does not fail this rollout.
            assert_eq!(at(Some(failed), "1.0", Some("1.5")), Some(Outcome::Pending));
            assert_eq!(at(Some(failed), "1.0", None), Some(Outcome::Pending));
        }
    }

    #[test]
    fn status_is_running_while_any_device_is_not_done_then_finished_or_superseded() {
        let release = v("2.0");
        let done = device(Some(7), Some(AgentState::Idle), "2.0", None);
        let failed = device(Some(7), Some(AgentState::Failed), "1.0", Some("2.0"));
        let pending = device(Some(7), None, "1.0", None);
        let moved = device(Some(9), None, "1.0", None);
        let held = device(
            Some(7),
            Some(AgentState::AwaitingReboot),
            "1.0",
            Some("2.0"),
        );

        let tally = Tally::of(
            &release,
            7,
            &[done.clone(), failed.clone(), pending, moved.clone(), held],
        );
        assert_eq!(
            tally.counts,
            uplift_proto::api::RolloutCounts {
                pending: 1,
                in_progress: 1,
                succeeded: 1,
                failed: 1,
                awaiting_reboot: 1,
            }
        );
        assert_eq!((tally.superseded, tally.total), (1, 5));
        assert_eq!(tally.status(), RolloutStatus::Running);

        let tally = Tally::of(&release, 7, &[done, failed, moved.clone()]);
        assert_eq!(tally.status(), RolloutStatus::Finished);

        assert_eq!(
            Tally::of(&release, 7, &[moved.clone(), moved]).status(),
            RolloutStatus::Superseded
        );
        assert_eq!(
            Tally::of(&release, 7, &[]).status(),
            RolloutStatus::Superseded
        );
    }

    fn create(release: &str, devices: Option<Vec<DeviceId>>) -> RolloutCreate {
        testing::rollout_request(release, devices, Default::default())
    }

    /// [`super::start`] as its answer, once its members are written too:
    /// these tests read the rows, which a request that needs them waits
    /// for as [`members_written`] does (the pending window has its own test).
    async fn start(
        state: &AppState,
        actor: &Principal,
        request: RolloutCreate,
    ) -> ServiceResult<RolloutView> {
        let view = super::start(state, actor, request).await?;
        testing::members_written(state, view.id).await;
        Ok(view)
    }

    #[tokio::test]
    async fn a_start_answers_before_its_members_are_written_counting_them_as_planned() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let a = testing::device(&state, "dev-a", "gw").await;
        testing::device(&state, "dev-b", "gw").await;
        // dev-a's session is told its offer and has not sent it yet: the
        // members wait for it (at most OFFERS_BEFORE_MEMBERS).
        let (tx, _rx) = tokio::sync::watch::channel(0);
        let session = state
            .hub
            .register_since(a.clone(), tx, state.hub.removal_epoch());

        let started = super::start(&state, &Principal::bootstrap_admin(), create("2", None))
            .await
            .unwrap();
        let id = started.id;
        let pending = |view: &RolloutView| {
            (
                view.devices_total,
                view.counts.pending,
                view.status,
                view.progress.as_ref().map(|p| p.phase_tallies.clone()),
            )
        };
        let planned = (
            2,
            2,
            RolloutStatus::Running,
            Some(vec![PhaseTally {
                devices: 2,
                offered: 2,
                succeeded: 0,
                failed: 0,
            }]),
        );
        assert_eq!(pending(&started), planned, "answered from the plan");
        assert!(
            state
                .store
                .rollout_plan(id)
                .await
                .unwrap()
                .unwrap()
                .members_pending,
            "the members are not written while an offer is owed"
        );
        let listed = list(&state).await.unwrap();
        assert_eq!(pending(&listed[0]), planned, "a view counts the plan too");

        // The member list needs the rows: it waits for them, and they are
        // written once the offer is sent.
        let state = std::sync::Arc::new(state);
        let page = tokio::spawn({
            let state = state.clone();
            async move { super::members(&state, id, RolloutMemberQuery::default()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!page.is_finished(), "the member list waits for the rows");
        session.offer_due.paid();
        let page = tokio::time::timeout(std::time::Duration::from_secs(5), page)
            .await
            .expect("the rows are written once the offer is sent")
            .unwrap()
            .unwrap();
        assert_eq!(page.devices.len(), 2);
        let written = view(&state, state.store.rollout(id).await.unwrap().unwrap())
            .await
            .unwrap();
        assert_eq!(pending(&written), planned, "the same counts from the rows");
    }

    #[tokio::test]
    async fn a_rollout_needs_a_stored_release_and_a_device_to_go_to() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let err = start(&state, &Principal::bootstrap_admin(), create("2.0", None))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "release 2.0 is not on the server; upload it with `uplift release upload`"
        );

        testing::release(&state, "2", "gw").await;
        testing::device(&state, "dev-other", "camera").await;
        let err = start(&state, &Principal::bootstrap_admin(), create("2", None))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest);
        assert_eq!(
            err.to_string(),
            "no devices to roll out to: none of type gw is enrolled"
        );
        assert!(state.store.list_rollouts().await.unwrap().is_empty());
    }

    /// A preview is the start's plan, shown: the same sizes the started
    /// rollout stores, the same refusals, and nothing done.
    #[tokio::test]
    async fn a_preview_counts_phases_as_the_start_does_refuses_what_it_refuses_and_changes_nothing()
    {
        use std::num::NonZeroU32;
        use uplift_proto::policy::{PhaseReach, RolloutPolicy};
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let mut ids = Vec::new();
        for i in 0..23 {
            ids.push(testing::device(&state, &format!("dev-{i:02}"), "gw").await);
        }
        testing::device(&state, "dev-cam", "camera").await;
        // Three connected: the other twenty are offline.
        let mut sessions = Vec::new();
        for id in &ids[..3] {
            let (tx, rx) = tokio::sync::watch::channel(0);
            state.hub.register(id.clone(), tx);
            sessions.push(rx);
        }
        let mut request = create("2", None);
        request.policy = RolloutPolicy {
            // 1 % and 2 % of 23 are both one device: the second phase is empty.
            phases: vec![
                PhaseReach::Percent(1),
                PhaseReach::Percent(2),
                PhaseReach::Count(NonZeroU32::new(5).unwrap()),
                PhaseReach::Percent(50),
            ],
            approval: true,
            ..RolloutPolicy::default()
        };

        let preview = preview(&state, request.clone()).await.unwrap();
        assert_eq!(preview.phase_sizes, [1, 0, 4, 7, 11]);
        assert_eq!(
            (
                preview.release.as_str(),
                preview.device_type.as_str(),
                preview.devices_total
            ),
            ("2", "gw", 23)
        );
        assert_eq!(
            preview.warnings,
            [
                "20 of the 23 devices are offline now; each is offered the release when it next connects",
                "phase 2 of 5 gets no devices (its reach adds none to the phases before it); it is passed at once",
            ]
        );
        // Nothing stored, offered or audited.
        assert!(state.store.list_rollouts().await.unwrap().is_empty());
        assert!(ids.iter().all(|id| state.live.target(id).is_none()));
        let audit = crate::service::audit::list(&state, Default::default())
            .await
            .unwrap();
        assert!(audit.entries.is_empty(), "{audit:?}");

        let started = start(&state, &Principal::bootstrap_admin(), request.clone())
            .await
            .unwrap();
        assert_eq!(
            started.progress.unwrap().phase_sizes,
            preview.phase_sizes,
            "the start stored the sizes the preview showed"
        );
        assert_eq!(started.devices_total, preview.devices_total);

        // The same refusals, word for word; a list of devices is checked
        // before anything is stored.
        let with = |f: &dyn Fn(&mut RolloutCreate)| {
            let mut request = create("2", None);
            f(&mut request);
            request
        };
        for bad in [
            create("9.9", None),
            with(&|r| r.policy.phases = vec![PhaseReach::Percent(50), PhaseReach::Percent(20)]),
            with(&|r| r.from_versions = vec![v("0.1")]),
            with(&|r| r.devices = Some(vec![ids[0].clone(), "dev-gone".parse().unwrap()])),
            with(&|r| {
                r.policy.dynamic = true;
                r.devices = Some(vec![ids[0].clone()]);
            }),
        ] {
            let previewed = super::preview(&state, bad.clone()).await.unwrap_err();
            let refused = start(&state, &Principal::bootstrap_admin(), bad)
                .await
                .unwrap_err();
            assert_eq!(
                (previewed.kind(), previewed.to_string()),
                (refused.kind(), refused.to_string())
            );
        }
        assert_eq!(state.store.list_rollouts().await.unwrap().len(), 1);

        // A dynamic rollout says that its devices are only those of today.
        let mut dynamic = create("2", None);
        dynamic.policy.dynamic = true;
        let preview = super::preview(&state, dynamic).await.unwrap();
        assert_eq!(preview.phase_sizes, [23]);
        assert!(
            preview.warnings[1].starts_with("a dynamic rollout also takes in devices"),
            "{:?}",
            preview.warnings
        );
    }

    #[tokio::test]
    async fn a_phased_rollout_offers_its_first_phase_and_refuses_commands_its_state_does_not_allow()
    {
        use uplift_proto::policy::{PhaseReach, RolloutPolicy};
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(testing::device(&state, &format!("dev-{i}"), "gw").await);
        }
        let mut request = create("2", None);
        request.policy = RolloutPolicy {
            phases: vec![PhaseReach::Percent(25)],
            approval: true,
            ..RolloutPolicy::default()
        };
        let view = start(&state, &Principal::bootstrap_admin(), request)
            .await
            .unwrap();
        let progress = view.progress.unwrap();
        assert_eq!(
            (progress.state.as_str(), progress.phase_sizes.clone()),
            ("running", vec![1, 3])
        );
        let offered = ids
            .iter()
            .filter(|d| state.live.target(d).is_some())
            .count();
        assert_eq!(offered, 1, "only the first phase is offered");

        let err = command(
            &state,
            view.id,
            RolloutCommandName::Approve,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(
            err.to_string()
                .contains("cannot approve a rollout that is running"),
            "{err}"
        );
        let offered: Vec<_> = ids
            .iter()
            .filter(|d| state.live.target(d).is_some())
            .cloned()
            .collect();
        let paused = command(
            &state,
            view.id,
            RolloutCommandName::Pause,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap();
        assert_eq!(paused.progress.unwrap().state, "paused");
        // The canary has not started (it never reported): the pause takes
        // its offer back, and the resume offers it again.
        for device in &offered {
            assert_eq!(state.live.target(device), None, "held while paused");
            let stored = state.store.device(device).await.unwrap().unwrap();
            assert_eq!(stored.target_rollout, None, "also in the database");
        }
        let resumed = command(
            &state,
            view.id,
            RolloutCommandName::Resume,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap();
        assert_eq!(resumed.progress.unwrap().state, "running");
        for device in &offered {
            assert!(state.live.target(device).is_some(), "offered again");
        }
        let aborted = command(
            &state,
            view.id,
            RolloutCommandName::Abort,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap();
        assert_eq!(aborted.progress.unwrap().state, "aborted");
        for device in &offered {
            assert_eq!(
                state.live.target(device),
                None,
                "the unfinished offer is withdrawn"
            );
            let stored = state.store.device(device).await.unwrap().unwrap();
            assert_eq!(stored.target_rollout, None, "also in the database");
        }
        let members = state.store.rollout_members(view.id).await.unwrap();
        let withdrawn = members
            .iter()
            .filter(|(m, _)| m.outcome == Some(crate::rollout::engine::Outcome::Withdrawn))
            .count();
        assert_eq!(withdrawn, 1);
        let err = command(
            &state,
            view.id,
            RolloutCommandName::Resume,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("it is over"), "{err}");
        let err = command(
            &state,
            view.id,
            RolloutCommandName::Retry,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no device failed"), "{err}");
        let err = command(
            &state,
            999,
            RolloutCommandName::Pause,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);

        let mut bad = create("2", None);
        bad.policy.phases = vec![PhaseReach::Percent(50), PhaseReach::Percent(20)];
        let err = start(&state, &Principal::bootstrap_admin(), bad)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest);
        assert!(err.to_string().contains("phases are cumulative"), "{err}");
    }

    #[tokio::test]
    async fn a_restarted_server_carries_a_phased_rollout_on_without_offering_anything_twice() {
        use uplift_proto::policy::{PhaseReach, RolloutPolicy};
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let state = testing::state(dir.path()).await;
            testing::release(&state, "2", "gw").await;
            for i in 0..4 {
                testing::device(&state, &format!("dev-{i}"), "gw").await;
            }
            let mut request = create("2", None);
            request.policy = RolloutPolicy {
                phases: vec![PhaseReach::Percent(50)],
                approval: true,
                success_percent: Some(50),
                ..RolloutPolicy::default()
            };
            start(&state, &Principal::bootstrap_admin(), request)
                .await
                .unwrap()
                .id
        };
        let offered_before =
            |members: &[(MemberRecord, DeviceStanding)]| -> Vec<(String, Option<Timestamp>)> {
                members
                    .iter()
                    .map(|(m, d)| (d.id.to_string(), m.offered_at))
                    .collect()
            };

        // A new process on the same data directory: state from the database only.
        let state = testing::state(dir.path()).await;
        let members = state.store.rollout_members(id).await.unwrap();
        let before = offered_before(&members);
        assert_eq!(before.iter().filter(|(_, at)| at.is_some()).count(), 2);
        crate::rollout::scheduler::advance(&state, id, OffsetDateTime::now_utc())
            .await
            .unwrap();
        let members = state.store.rollout_members(id).await.unwrap();
        assert_eq!(
            offered_before(&members),
            before,
            "a tick after the restart offers nothing again"
        );
        // The devices' targets survive in the database for the sessions.
        let targeted = state.store.device_targets().await.unwrap();
        assert_eq!(targeted.len(), 2);
        assert!(targeted.iter().all(|(_, t)| t.rollout_id == id));
    }

    #[tokio::test]
    async fn starting_a_rollout_targets_its_devices_and_the_newest_supersedes() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        testing::release(&state, "3", "gw").await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let b = testing::device(&state, "dev-b", "gw").await;
        testing::device(&state, "dev-c", "camera").await;

        let first = start(&state, &Principal::bootstrap_admin(), create("2", None))
            .await
            .unwrap();
        assert_eq!((first.devices_total, first.counts.pending), (2, 2));
        assert_eq!(first.status, RolloutStatus::Running);
        assert_eq!(state.live.target(&a).unwrap().rollout_id, first.id);

        let second = start(
            &state,
            &Principal::bootstrap_admin(),
            create("3", Some(vec![b.clone()])),
        )
        .await
        .unwrap();
        assert_eq!(state.live.target(&a).unwrap().rollout_id, first.id);
        assert_eq!(state.live.target(&b).unwrap().rollout_id, second.id);
        // Device b reports it runs the new release.
        state.live.claim(
            &b,
            crate::hub::SessionSerial::from_raw(1),
            ts("2026-12-02T10:00:00Z"),
        );
        let report = Report {
            state: AgentState::Idle,
            running_version: v("3"),
            booted_slot: "b".parse().unwrap(),
            target_version: None,
            progress: None,
            error: None,
        };
        state.live.apply(
            &b,
            crate::hub::SessionSerial::from_raw(1),
            &report,
            ts("2026-12-02T10:00:00Z"),
        );
        // Rollout views count what is stored: the writer's next batch.
        assert_eq!(get(&state, second.id).await.unwrap().counts.succeeded, 0);
        assert!(testing::flush_writes(&state).await);

        let listed = list(&state).await.unwrap();
        let one_by_one = [
            get(&state, first.id).await.unwrap(),
            get(&state, second.id).await.unwrap(),
        ];
        assert_eq!(
            listed, one_by_one,
            "the aggregate query sees what the per-rollout one does"
        );
        assert_eq!((listed[0].superseded, listed[0].counts.pending), (1, 1));
        assert_eq!(listed[0].status, RolloutStatus::Running);
        assert_eq!(listed[1].counts.succeeded, 1);
        assert_eq!(listed[1].status, RolloutStatus::Finished);
        // Each says so of the other.
        let moved = |rollout_id| {
            vec![RolloutShare {
                rollout_id,
                devices: 1,
            }]
        };
        assert_eq!(listed[0].superseded_by, moved(second.id));
        assert!(listed[0].supersedes.is_empty());
        assert_eq!(listed[1].supersedes, moved(first.id));
        assert!(listed[1].superseded_by.is_empty());

        let err = get(&state, 99).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "rollout 99 does not exist; see `uplift rollout list`"
        );
    }

    async fn tag(state: &AppState, device: &DeviceId, tags: &[&str]) {
        crate::service::devices::change_tags(
            state,
            &Principal::bootstrap_admin(),
            device,
            uplift_proto::api::TagChange {
                add: tags.iter().map(|t| t.parse().unwrap()).collect(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }

    fn tagged(any: bool, tags: &[&str]) -> Option<uplift_proto::api::TagSelector> {
        let tags = tags.iter().map(|t| t.parse().unwrap()).collect();
        Some(if any {
            uplift_proto::api::TagSelector::Any(tags)
        } else {
            uplift_proto::api::TagSelector::All(tags)
        })
    }

    async fn members(state: &AppState, id: i64) -> Vec<String> {
        state
            .store
            .rollout_members(id)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, d)| d.id.to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_rollout_by_tags_and_versions_takes_only_the_devices_that_match() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let b = testing::device(&state, "dev-b", "gw").await;
        let c = testing::device(&state, "dev-c", "gw").await;
        let cam = testing::device(&state, "dev-cam", "camera").await;
        tag(&state, &a, &["canary", "berlin"]).await;
        tag(&state, &b, &["berlin"]).await;
        tag(&state, &cam, &["canary"]).await;
        let running = |id: &DeviceId, version: &str| {
            let serial = crate::hub::SessionSerial::from_raw(1);
            state.live.claim(id, serial, ts("2026-12-02T10:00:00Z"));
            state.live.apply(
                id,
                serial,
                &Report {
                    state: AgentState::Idle,
                    running_version: v(version),
                    booted_slot: "a".parse().unwrap(),
                    target_version: None,
                    progress: None,
                    error: None,
                },
                ts("2026-12-02T10:00:00Z"),
            );
        };
        running(&a, "1.0");
        running(&b, "1.1");
        running(&c, "1.0");

        let with = |f: &dyn Fn(&mut RolloutCreate)| {
            let mut request = create("2", None);
            f(&mut request);
            request
        };
        // Refused, and nothing started.
        for (request, message) in [
            (
                with(&|r| {
                    r.devices = Some(vec![a.clone()]);
                    r.tags = tagged(true, &["canary"]);
                }),
                "a rollout targets a device list or devices with tags, not both; leave out one of them",
            ),
            (
                with(&|r| r.tags = tagged(true, &[])),
                "the tag selector names no tag; give at least one tag, or leave the selector out",
            ),
            (
                with(&|r| r.tags = tagged(true, &["nowhere", "nothing"])),
                "no devices to roll out to: no device of type gw has any of the tags nowhere, nothing; \
                 check `uplift devices list`",
            ),
            (
                with(&|r| {
                    r.tags = tagged(false, &["berlin"]);
                    r.from_versions = vec![v("9.9"), v("9.8")];
                }),
                "no devices to roll out to: no device of type gw has all of the tags berlin and runs 9.9 or 9.8; \
                 check `uplift devices list`",
            ),
            (
                with(&|r| r.from_versions = vec![v("9.9")]),
                "no devices to roll out to: no device of type gw runs 9.9; check `uplift devices list`",
            ),
            (
                with(&|r| {
                    r.devices = Some(vec![a.clone(), b.clone()]);
                    r.from_versions = vec![v("9.9")];
                }),
                "no devices to roll out to: no device of the 2 listed runs 9.9; check `uplift devices list`",
            ),
            (
                with(&|r| {
                    r.devices = Some(vec![a.clone(), "dev-gone".parse().unwrap()]);
                    r.from_versions = vec![v("1.0")];
                }),
                "device dev-gone is not enrolled on this server; see `uplift devices list`",
            ),
            (
                with(&|r| {
                    r.policy.dynamic = true;
                    r.from_versions = vec![v("1.0")];
                }),
                "a dynamic rollout admits devices as they enroll, before they have said what they run; \
                 leave out the dynamic option or the versions to upgrade from",
            ),
        ] {
            let err = start(&state, &Principal::bootstrap_admin(), request).await.unwrap_err();
            assert_eq!(err.to_string(), message);
            assert!(matches!(err.kind(), ErrorKind::BadRequest | ErrorKind::NotFound));
        }
        assert!(state.store.list_rollouts().await.unwrap().is_empty());

        for (request, want) in [
            // Both tags, of the release's type only (the camera is tagged too).
            (
                with(&|r| r.tags = tagged(false, &["canary", "berlin"])),
                vec!["dev-a"],
            ),
            (
                with(&|r| r.tags = tagged(true, &["canary", "berlin"])),
                vec!["dev-a", "dev-b"],
            ),
            // Versions as the devices report them live.
            (
                with(&|r| {
                    r.tags = tagged(true, &["berlin"]);
                    r.from_versions = vec![v("1.1")];
                }),
                vec!["dev-b"],
            ),
            (
                with(&|r| r.from_versions = vec![v("1.0")]),
                vec!["dev-a", "dev-c"],
            ),
            (
                with(&|r| {
                    r.devices = Some(vec![c.clone(), b.clone(), a.clone()]);
                    r.from_versions = vec![v("1.1")];
                }),
                vec!["dev-b"],
            ),
        ] {
            let (tags, versions) = (request.tags.clone(), request.from_versions.clone());
            let view = start(&state, &Principal::bootstrap_admin(), request)
                .await
                .unwrap();
            assert_eq!(members(&state, view.id).await, want);
            assert_eq!((view.tags, view.from_versions), (tags, versions));
        }
    }

    #[tokio::test]
    async fn a_dynamic_rollout_by_tags_takes_in_devices_that_come_to_have_them() {
        use uplift_proto::policy::{PhaseReach, RolloutPolicy};
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let b = testing::device(&state, "dev-b", "gw").await;
        tag(&state, &a, &["ring-1"]).await;
        let mut request = create("2", None);
        request.tags = tagged(true, &["ring-1"]);
        request.policy = RolloutPolicy {
            dynamic: true,
            phases: vec![PhaseReach::Count(std::num::NonZeroU32::MIN)],
            approval: true,
            ..RolloutPolicy::default()
        };
        let view = start(&state, &Principal::bootstrap_admin(), request)
            .await
            .unwrap();
        assert_eq!(members(&state, view.id).await, ["dev-a"]);
        // A newcomer without tags is not taken in; one tagged later is,
        // in the current phase, and offered what it allows.
        let c = testing::device(&state, "dev-c", "gw").await;
        join_dynamic(&state, &c, &"gw".parse().unwrap(), &[]).await;
        assert_eq!(members(&state, view.id).await, ["dev-a"]);
        tag(&state, &b, &["ring-2"]).await;
        tag(&state, &c, &["ring-1"]).await;
        assert_eq!(members(&state, view.id).await, ["dev-a", "dev-c"]);
        assert_eq!(state.live.target(&c).map(|t| t.rollout_id), Some(view.id));
        assert_eq!(state.live.target(&b), None);
        // A device a newer rollout holds is not taken back by an older one.
        let newer = start(
            &state,
            &Principal::bootstrap_admin(),
            create("2", Some(vec![b.clone()])),
        )
        .await
        .unwrap();
        tag(&state, &b, &["ring-1"]).await;
        assert_eq!(members(&state, view.id).await, ["dev-a", "dev-c"]);
        assert_eq!(state.live.target(&b).map(|t| t.rollout_id), Some(newer.id));
    }

    #[tokio::test]
    async fn a_rollouts_devices_come_in_pages_by_phase_and_can_be_filtered() {
        use uplift_proto::api::MemberOutcome;
        use uplift_proto::policy::{PhaseReach, RolloutPolicy};
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        for i in 0..25 {
            testing::device(&state, &format!("dev-{i:02}"), "gw").await;
        }
        let policy = RolloutPolicy {
            phases: vec![PhaseReach::Count(5.try_into().unwrap())],
            approval: true,
            ..RolloutPolicy::default()
        };
        let id = testing::start_rollout(&state, testing::rollout_request("2", None, policy)).await;
        let page = |query: RolloutMemberQuery| {
            let state = &state;
            async move { super::members(state, id, query).await.unwrap() }
        };

        // Every device once, phase 1 first, in pages of 7.
        let mut seen = Vec::new();
        let mut query = RolloutMemberQuery {
            limit: Some(7),
            ..RolloutMemberQuery::default()
        };
        loop {
            let got = page(query.clone()).await;
            assert!(got.devices.len() <= 7);
            seen.extend(
                got.devices
                    .into_iter()
                    .map(|m| (m.phase, m.device_id.to_string())),
            );
            match got.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted, "in (phase, device) order, no device twice");
        assert_eq!(seen.len(), 25);
        assert_eq!(seen.iter().filter(|(phase, _)| *phase == 0).count(), 5);

        // One phase; then only those not finished (the first phase was
        // offered, none has finished).
        let final_phase = page(RolloutMemberQuery {
            phase: Some(1),
            ..RolloutMemberQuery::default()
        })
        .await;
        assert_eq!(final_phase.devices.len(), 20);
        assert!(final_phase
            .devices
            .iter()
            .all(|m| m.phase == 1 && m.offered_at.is_none()));
        let unfinished = page(RolloutMemberQuery {
            outcome: Some(MemberOutcome::Unfinished),
            ..RolloutMemberQuery::default()
        })
        .await;
        assert_eq!(unfinished.devices.len(), 25);
        let failed = page(RolloutMemberQuery {
            outcome: Some(MemberOutcome::Failed),
            ..RolloutMemberQuery::default()
        })
        .await;
        assert!(failed.devices.is_empty() && failed.next.is_none());

        // A cursor this server did not give out is refused, saying so.
        let err = super::members(
            &state,
            id,
            RolloutMemberQuery {
                after: Some("dev-01".into()),
                ..RolloutMemberQuery::default()
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("not a cursor"), "{err}");
    }
}
