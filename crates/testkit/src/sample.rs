//! Made-up data shaped like what the system carries, for tests and
//! benchmarks.

use cellmon_domain::event::StudentKey;
use cellmon_domain::fields::Email;
use cellmon_domain::live::{LiveBody, StudentRef, Unnumbered};
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_domain::status::{Status, StudentStatus};

/// A student update for one of 100 students, as the persister would publish
/// it; `n` is its execution count.
pub fn student_update(class: ClassId, n: u64) -> Unnumbered {
    let student = n % 100;
    Unnumbered {
        class_id: class,
        body: LiveBody::StudentUpdate {
            student: StudentRef {
                id: StudentId(uuid::Uuid::from_u128(u128::from(student) + 1)),
                key: StudentKey::Email(
                    Email::parse(&format!("student{student}@bench.invalid"))
                        .unwrap_or_else(|_| unreachable!("a valid e-mail")),
                ),
                name: None,
                team: None,
            },
            status: StudentStatus {
                status: Status::Active,
                help: Vec::new(),
                significant_errors: Vec::new(),
                last_execution_failed: false,
                last_activity: None,
                executions: u32::try_from(n).unwrap_or(u32::MAX),
                failed_executions: 0,
            },
        },
    }
}
