"""linkage: links, audit, match weights

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 00:11:16.589152
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('match_weight',
    sa.Column('field', sa.String(length=32), nullable=False),
    sa.Column('level', sa.String(length=32), nullable=False),
    sa.Column('m', sa.Float(), nullable=False),
    sa.Column('u', sa.Float(), nullable=False),
    sa.Column('confirmed', sa.Integer(), nullable=False),
    sa.Column('rejected', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('field', 'level')
    )
    op.create_table('link',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.Enum('same_patient_different_id', 'different_patient_same_id', name='link_kind', native_enum=False, length=32), nullable=False),
    sa.Column('status', sa.Enum('open', 'confirmed', 'rejected', name='link_status', native_enum=False, length=16), nullable=False),
    sa.Column('band', sa.String(length=16), nullable=False),
    sa.Column('a_study_pk', sa.Integer(), nullable=False),
    sa.Column('b_study_pk', sa.Integer(), nullable=False),
    sa.Column('a_patient_pk', sa.Integer(), nullable=False),
    sa.Column('b_patient_pk', sa.Integer(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_by', sa.String(length=64), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['a_patient_pk'], ['patient.id'], ),
    sa.ForeignKeyConstraint(['a_study_pk'], ['study.id'], ),
    sa.ForeignKeyConstraint(['b_patient_pk'], ['patient.id'], ),
    sa.ForeignKeyConstraint(['b_study_pk'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('link', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_link_a_patient_pk'), ['a_patient_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_a_study_pk'), ['a_study_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_b_patient_pk'), ['b_patient_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_b_study_pk'), ['b_study_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_status'), ['status'], unique=False)

    op.create_table('link_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('link_pk', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=True),
    sa.Column('to_status', sa.String(length=16), nullable=False),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['link_pk'], ['link.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('link_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_link_event_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_link_event_link_pk'), ['link_pk'], unique=False)

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('linked_at', sa.DateTime(timezone=True), nullable=True))

    # Candidate blocking on birth date (linkage.engine) must not scan every study.
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index('ix_study_patient_birth_date', ['patient_birth_date'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index('ix_study_patient_birth_date')

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('linked_at')

    with op.batch_alter_table('link_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_link_event_link_pk'))
        batch_op.drop_index(batch_op.f('ix_link_event_at'))

    op.drop_table('link_event')
    with op.batch_alter_table('link', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_link_status'))
        batch_op.drop_index(batch_op.f('ix_link_kind'))
        batch_op.drop_index(batch_op.f('ix_link_b_study_pk'))
        batch_op.drop_index(batch_op.f('ix_link_b_patient_pk'))
        batch_op.drop_index(batch_op.f('ix_link_a_study_pk'))
        batch_op.drop_index(batch_op.f('ix_link_a_patient_pk'))

    op.drop_table('link')
    op.drop_table('match_weight')
