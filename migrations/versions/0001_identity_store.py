"""identity store: patient, study, series, instance

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 21:45:28.561917
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('patient',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=128), nullable=False),
    sa.Column('issuer_qualifiers', sa.JSON(), nullable=True),
    sa.Column('other_patient_ids', sa.JSON(), nullable=True),
    sa.Column('name', sa.String(length=324), nullable=True),
    sa.Column('birth_date', sa.String(length=8), nullable=True),
    sa.Column('sex', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'issuer', name='uq_patient_id_issuer')
    )
    op.create_table('study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_pk', sa.Integer(), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=True),
    sa.Column('study_time', sa.String(length=16), nullable=True),
    sa.Column('accession_number', sa.String(length=16), nullable=True),
    sa.Column('description', sa.String(length=64), nullable=True),
    sa.Column('patient_name', sa.String(length=324), nullable=True),
    sa.Column('patient_birth_date', sa.String(length=8), nullable=True),
    sa.Column('patient_sex', sa.String(length=16), nullable=True),
    sa.Column('patient_age', sa.String(length=4), nullable=True),
    sa.Column('conflicting_instances', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_pk'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_uid')
    )
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_patient_pk'), ['patient_pk'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('body_part', sa.String(length=64), nullable=True),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('description', sa.String(length=64), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.Enum('receiving', 'stable', 'processing', 'done', 'failed', name='series_state', native_enum=False, length=16), nullable=False),
    sa.Column('state_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_last_received_at'), ['last_received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_pk'), ['study_pk'], unique=False)

    op.create_table('instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('series_pk', sa.Integer(), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_pk'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_series_pk'), ['series_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_series_pk'))

    op.drop_table('instance')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_pk'))
        batch_op.drop_index(batch_op.f('ix_series_state'))
        batch_op.drop_index(batch_op.f('ix_series_last_received_at'))

    op.drop_table('series')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_patient_pk'))

    op.drop_table('study')
    op.drop_table('patient')
